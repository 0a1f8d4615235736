"""``sum_grad_squared``: exact ``sum_n (d loss_n / d p)**2`` for every parameter of a module.

How it works (one forward, one batched backward, and per-sample work only where no closed form
exists):

1. While the closure runs, forward hooks record every call of a submodule that has an exact rule
   (:mod:`.rules`): its input, its output (with a tensor hook on it) and which requested
   parameters it used directly (the tensor the module held under the parameter's name was the
   parameter itself, or a same-layout view: a weight computed from the parameter inside the call,
   such as ``mask * theta`` through ``torch.func.functional_call``, a parametrization or pruning,
   has another gradient). ``nn.MultiheadAttention`` runs :func:`.attention.attention_forward`,
   which records each projection as a Linear call on ``[N, L, E]`` inputs (rows of a packed
   ``in_proj_weight`` as row ranges). Calls that autograd does not record (a ``no_grad`` pass for
   the predicted label) are ignored. Every submodule's first call is kept too, for the fallback.
2. After the closure the autograd graph is checked, once: a walk from the losses that steps over
   every recorded call (from its output straight to its input) tells which parameters are used
   outside the recorded calls; a short walk inside each call tells which it used. A parameter
   used only by recorded calls gets its rules: applied directly when one call (or disjoint row
   ranges) uses it, or, when several calls use it (a reused module, an embedding tied to the
   output layer), per-sample gradients of every call summed in blocks of samples before squaring.
   A parameter with no sample dimension that enters the batch through one add, sub, mul or
   expand (learned positional tables, ``nn.Embedding`` of position ids ``[1, L]``, class tokens,
   layer scales: :mod:`.broadcast`) gets its per-sample gradient from a pre-hook on that op.
3. One ``torch.autograd.grad`` of ``sum_n loss_n`` w.r.t. the recorded calls' outputs (weight
   gradients are never formed). Tensor hooks receive ``d loss_n / d out_n`` row by row and run
   the rules at once, so the gradients are dropped layer by layer.
4. Everything else takes a fallback (:mod:`.fallback`), with a one-time
   :class:`FisherFallbackWarning` naming the parameter and why: ``torch.func`` ``vmap(grad)`` over
   the smallest module whose single call holds every use of the parameter (never slower than
   ``vmap(grad)`` of the model), else chunked ``is_grads_batched`` backward passes through the
   whole graph (with the math attention backend).

BatchNorm: in train mode it normalizes with statistics of the whole batch, so sample ``n``'s loss
depends on every sample and "per-sample gradient" has no single meaning. The estimate therefore
uses eval-mode (running) statistics: ``eval_mode=True`` (the default) runs the closure with
``module.eval()`` (dropout off too) and restores every submodule's previous mode afterwards. A
BatchNorm that would still use batch statistics (``eval_mode=False`` on a module in train mode,
or ``track_running_stats=False``) is rejected with a ``ValueError``. ``eval_mode`` acts on
``module`` only; a BatchNorm outside it (in a task head) that the closure runs with batch
statistics is detected by a global forward hook and also rejected. Other cross-sample layers
outside the known ones cannot be detected: the closure's contract is that sample ``n``'s loss
depends only on sample ``n``, and that layers keep samples along dim 0 (``batch_first``).
"""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from .. import autograd_graph, backends
from .._checks import check_scale
from . import attention, broadcast, fallback
from .rules import LINEAR, Call, Rule, find_rule, is_attention, sample_block

Node = torch.autograd.graph.Node

# A call's own ops (between its output and its input) are a handful of autograd nodes; a walk that
# goes further has left the call (its input had no grad_fn to stop at) and proves nothing.
_MAX_LOCAL_NODES = 32


class FisherFallbackWarning(UserWarning):
    """A parameter took a fallback of :func:`sum_grad_squared` (issued once per cause)."""


_WARNED: set[tuple[str, str, str]] = set()


def _warn_once(owner: str, param: str, reason: str, how: str) -> None:
    key = (owner, param, reason)
    if key in _WARNED:
        return
    _WARNED.add(key)
    warnings.warn(
        f"sum_grad_squared: parameter {param!r} of {owner} has no exact rule ({reason}); it takes the fallback: {how}",
        FisherFallbackWarning,
        stacklevel=4,
    )


@dataclass(eq=False)
class _Call:
    """One recorded layer call: what its rule needs, and how it sits in the graph."""

    rule: Rule
    module: nn.Module
    x: torch.Tensor
    out: torch.Tensor
    out_node: Node
    x_edge: Node | None  # the node the input's gradient flows into (None: no gradient)
    training: bool
    claims: dict[str, tuple[int, slice | None]]  # parameter name -> (index in params, rows)
    x_version: int = 0
    out_version: int = 0
    local: set[int] = field(default_factory=set)  # id() of leaves the call's own ops reach
    local_complete: bool = False
    mode: str = ""  # "sample" (samples along dim 0), "broadcast" (no sample dim), "" (not used)
    bufs: dict[str, torch.Tensor] = field(default_factory=dict)  # buffers its rule fills directly
    keep: bool = False  # keep the gradient: some claimed parameter is summed over calls
    active: bool = False
    done: bool = False
    g: torch.Tensor | None = None
    handle: torch.utils.hooks.RemovableHandle | None = None

    def drop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
        self.handle = None
        self.x = self.out = self.g = None


@dataclass(eq=False)
class _ModuleCall:
    """The first call with a graph of a submodule, for the ``vmap`` fallback."""

    module: nn.Module
    args: tuple
    kwargs: dict
    outputs: list[torch.Tensor]  # tensor leaves of its output
    nodes: list[Node | None]  # their grad_fn at the call
    versions: list[int]
    in_versions: list[tuple[torch.Tensor, int]]
    calls: int = 1

    @property
    def grad_outputs(self) -> list[torch.Tensor]:
        """The outputs that carry a gradient, in the order of the output's tensor leaves."""
        return [t for t in self.outputs if t.grad_fn is not None]


def _edge_node(t: torch.Tensor) -> Node | None:
    if not t.requires_grad:
        return None
    return torch.autograd.graph.get_gradient_edge(t).node


def _local_leaves(out_node: Node, stop: Node | None) -> tuple[set[int], bool]:
    """id() of the leaf tensors reached from ``out_node`` without passing through ``stop``, and
    whether the walk stayed within :data:`_MAX_LOCAL_NODES` nodes (a longer walk left the call)."""
    found: set[int] = set()
    inner = 0
    for node, _ in autograd_graph.walk([out_node], lambda n, nr: n is stop):
        leaf = autograd_graph.leaf_tensor(node)
        if leaf is not None:
            found.add(id(leaf))
            continue
        inner += 1
        if inner > _MAX_LOCAL_NODES:
            return found, False
    return found, True


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _first_tensor_arg(args, kwargs) -> torch.Tensor | None:
    if args:
        return args[0] if isinstance(args[0], torch.Tensor) else None
    value = kwargs.get("input")
    return value if isinstance(value, torch.Tensor) else None


def _check_args(module, closure, params, out, scale, chunk_size, eval_mode, backend):
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    owned = {id(p): p for p in module.parameters()}
    if params is None:
        params = [p for p in owned.values() if p.requires_grad]
        if not params:
            raise ValueError("params: module has no parameters with requires_grad=True")
    else:
        if isinstance(params, torch.Tensor) or not isinstance(params, Sequence):
            raise TypeError(f"params must be a list or tuple of parameters of module, got {type(params).__name__}")
        params = list(params)
        if not params:
            raise ValueError("params must not be empty")
        seen: set[int] = set()
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.nn.Parameter, got {type(p).__name__}")
            if id(p) not in owned:
                raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of module")
            if id(p) in seen:
                raise ValueError(f"params[{i}] appears more than once in params")
            if not p.requires_grad:
                raise ValueError(f"params[{i}] has requires_grad=False; its gradient is not defined")
            seen.add(id(p))
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise TypeError(f"params[{i}] has dtype {p.dtype}; expected a floating dtype")
        if p.device != params[0].device:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {params[0].device}")
    if out is not None:
        if isinstance(out, torch.Tensor) or not isinstance(out, Sequence):
            raise TypeError(f"out must be a list or tuple of float32 tensors, got {type(out).__name__}")
        out = list(out)
        if len(out) != len(params):
            raise ValueError(f"out has {len(out)} tensors but there are {len(params)} params")
        for i, (o, p) in enumerate(zip(out, params, strict=True)):
            if not isinstance(o, torch.Tensor):
                raise TypeError(f"out[{i}] must be a torch.Tensor, got {type(o).__name__}")
            if o.dtype != torch.float32:
                raise TypeError(f"out[{i}] has dtype {o.dtype}; Fisher buffers are float32")
            if o.shape != p.shape:
                raise ValueError(f"out[{i}] has shape {tuple(o.shape)} but params[{i}] has {tuple(p.shape)}")
            if o.device != p.device:
                raise ValueError(f"out[{i}] is on {o.device} but params[{i}] is on {p.device}")
            if o.requires_grad:
                raise ValueError(f"out[{i}] requires grad; Fisher buffers are updated in place")
    check_scale(scale)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(eval_mode, bool):
        raise TypeError(f"eval_mode must be a bool, got {type(eval_mode).__name__}")
    # Raises ValueError / BackendUnavailableError naming the backend before anything runs.
    backends.select(backend, params[0].device)
    return params, out


def _check_batch_norms(module: nn.Module, eval_mode: bool) -> None:
    for name, m in module.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            uses_batch_stats = m.running_mean is None or (m.training and not eval_mode)
            if uses_batch_stats:
                label = name or type(m).__name__
                raise ValueError(
                    f"eval_mode={eval_mode}: BatchNorm {label!r} would normalize with batch statistics, which "
                    "couples samples so per-sample gradients are undefined; use eval_mode=True and "
                    "track_running_stats=True"
                )


def _check_losses(losses) -> torch.Tensor:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"closure must return a tensor of per-sample losses, got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(f"closure must return per-sample losses of shape [N], got shape {tuple(losses.shape)}")
    if not losses.is_floating_point():
        raise TypeError(f"closure returned losses of dtype {losses.dtype}; expected a floating dtype")
    if losses.numel() and not losses.requires_grad:
        raise ValueError("closure returned losses that do not require grad (was the forward run under no_grad?)")
    return losses


def _uses_parameter(used, param: torch.Tensor) -> bool:
    """True when ``used`` (the tensor a module holds under a parameter's name during its call) is
    ``param`` itself or a view of all of it in the same layout: then the gradient the layer rule
    forms for ``used`` is the parameter's gradient."""
    if used is param:
        return True
    return (
        isinstance(used, torch.Tensor)
        and used._base is param
        and used.shape == param.shape
        and used.stride() == param.stride()
        and used.storage_offset() == param.storage_offset()
    )


def sum_grad_squared(
    module: nn.Module,
    closure: Callable[[], torch.Tensor],
    params: Sequence[nn.Parameter] | None = None,
    *,
    out: Sequence[torch.Tensor] | None = None,
    scale: float = 1.0,
    chunk_size: int = 32,
    eval_mode: bool = True,
    backend: str = "auto",
) -> list[torch.Tensor]:
    """Sum over samples of squared per-sample gradients (the empirical Fisher diagonal of Eq. 10).

    ``F_i += scale * sum_n (d loss_n / d p_i)**2`` for each ``p_i`` in ``params``, exactly, from
    one forward and one batched backward; per-sample gradients of the whole model are never held.
    Exact layer rules: Linear (2-D and sequence inputs), ``nn.MultiheadAttention`` (packed or
    separate projections), Hugging Face GPT-2's ``Conv1D``, Conv1d/Conv2d, Embedding (also of
    position ids without a sample dimension, and tied to an output layer), LayerNorm, RMSNorm,
    GroupNorm, eval-mode BatchNorm, and parameters added, multiplied or expanded into the batch
    (positional tables, class tokens, layer scales). Reused modules and tied weights sum their
    calls' per-sample gradients before squaring. Any other parameter takes a fallback (``vmap``
    of its module, else chunked batched backward passes) with a one-time
    :class:`FisherFallbackWarning`. See :mod:`fsmtl_kernels.fisher_engine.engine`.

    Args:
        module: the module whose parameters are estimated (e.g. the shared trunk); hooks go on its
            submodules and are removed before returning, also when the closure raises.
        closure: runs the forward of the whole model and returns per-sample losses ``[N]`` (e.g.
            ``-log p(predicted label)``); sample ``n``'s loss must depend only on sample ``n``,
            and modules must keep samples along dim 0 (``batch_first``).
        params: parameters of ``module`` to estimate, in this order (default: all with
            ``requires_grad``).
        out: float32 buffers shaped like ``params`` to accumulate into (zeros when None). They are
            updated only after every term is computed, so an error leaves them unchanged.
        scale: multiplies the sums, e.g. ``1 / N`` for the empirical mean.
        chunk_size: at most this many samples per block of per-sample gradients (rules and
            fallbacks); blocks also stay under ``rules.BLOCK_ELEMENTS`` entries.
        eval_mode: run the closure with ``module.eval()`` (BatchNorm on running statistics,
            dropout off), restoring every submodule's mode afterwards.
        backend: ``"auto" | "reference" | "triton" | "cpp"`` for the accumulation kernels.

    Returns:
        float32 tensors shaped like ``params`` (``out`` itself when given). ``.grad`` of every
        parameter is left untouched.
    """
    params, out = _check_args(module, closure, params, out, scale, chunk_size, eval_mode, backend)
    run = _Run(module, params, float(scale), chunk_size, backend)
    modes = [(m, m.training) for m in module.modules()]
    try:
        if eval_mode:
            module.eval()
        _check_batch_norms(module, eval_mode)
        run.install()
        coupled: list[str] = []
        run.handles.append(nn.modules.module.register_module_forward_hook(_make_batch_stats_hook(coupled)))
        with torch.enable_grad():
            losses = _check_losses(closure())
        if coupled:
            raise ValueError(
                f"closure ran {coupled[0]} with batch statistics (train mode or track_running_stats=False), "
                "which couples samples so per-sample gradients are undefined; put the layers outside module "
                "in eval mode during estimation"
            )
        run.uninstall()
        if losses.shape[0]:
            run.estimate(losses, closure)
    finally:
        run.uninstall()
        run.drop()
        for m, training in modes:
            m.training = training
    if out is None:
        return run.acc
    for o, a in zip(out, run.acc, strict=True):
        o.add_(a)
    return out


def _make_batch_stats_hook(coupled: list[str]):
    """A global forward hook noting BatchNorm calls that normalize with batch statistics (e.g. in a
    task head outside ``module``, which ``eval_mode`` does not reach)."""

    def hook(module, args, output):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (module.training or module.running_mean is None):
            if isinstance(output, torch.Tensor) and output.grad_fn is not None:
                coupled.append(repr(module))
        return None

    return hook


@dataclass(eq=False)
class _Broadcast:
    """A tensor without a sample dimension entering the batch at input ``index`` of ``node``:
    a parameter (``param`` set) or the output of a recorded call (``call`` set)."""

    node: Node
    index: int
    shape: torch.Size
    param: int | None = None
    call: _Call | None = None
    failed: bool = False


class _Run:
    """The state of one :func:`sum_grad_squared` call."""

    def __init__(self, module: nn.Module, params: list[torch.Tensor], scale: float, chunk: int, backend: str):
        self.module = module
        self.params = params
        self.scale = scale
        self.chunk = chunk
        self.backend = backend
        self.index = {id(p): i for i, p in enumerate(params)}
        self.acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        self.names = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name or "<module>")
        self.labels = {m: name for name, m in module.named_modules(remove_duplicate=False)}
        # What each module holds as parameters: a call that saw other tensors there ran under
        # functional_call, which a re-run of the module (the vmap fallback) would not reproduce.
        self.registered = {m: tuple(map(id, m._parameters.values())) for m in module.modules()}
        self.swapped: set[nn.Module] = set()
        self.calls: list[_Call] = []
        self.module_calls: dict[nn.Module, _ModuleCall] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.patched: list[nn.Module] = []
        self.node_handles: list = []
        self.failed: dict[int, str] = {}  # param index -> why its rule could not be used

    # ------------------------------------------------------------------------------ recording
    def install(self) -> None:
        for m in self.module.modules():
            self.handles.append(m.register_forward_hook(self._module_hook, with_kwargs=True))
            if is_attention(m) and any(id(p) in self.index for p in m.parameters()):
                m.forward = types.MethodType(functools.partial(_attention_forward, run=self), m)
                self.patched.append(m)
                continue
            rule = find_rule(m)
            if rule is None:
                continue
            claims = {
                name: self.index[id(p)]
                for name, p in m._parameters.items()
                if name in ("weight", "bias") and p is not None and id(p) in self.index
            }
            if claims:
                hook = functools.partial(self._rule_hook, rule=rule, claims=claims)
                self.handles.append(m.register_forward_hook(hook, with_kwargs=True))

    def uninstall(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m in self.patched:
            del m.forward
        self.patched.clear()

    def drop(self) -> None:
        for call in self.calls:
            call.drop()
        for h in self.node_handles:
            h.remove()
        self.node_handles.clear()
        self.calls.clear()
        self.module_calls.clear()

    def _module_hook(self, module, args, kwargs, output) -> None:
        if tuple(map(id, module._parameters.values())) != self.registered.get(module):
            self.swapped.add(module)
        leaves = [output] if isinstance(output, torch.Tensor) else _tensors(output)
        if not any(t.grad_fn is not None for t in leaves):
            return  # not recorded by autograd (e.g. a no_grad pass for the predicted label)
        seen = self.module_calls.get(module)
        if seen is not None:
            seen.calls += 1
            return
        flat = not kwargs and not any(isinstance(a, (list, tuple, dict)) for a in args)
        inputs = [a for a in args if isinstance(a, torch.Tensor)] if flat else _tensors((args, kwargs))
        self.module_calls[module] = _ModuleCall(
            module,
            args,
            kwargs,
            leaves,
            [t.grad_fn for t in leaves],
            [t._version for t in leaves],
            [(t, t._version) for t in inputs],
        )

    def _rule_hook(self, module, args, kwargs, output, *, rule, claims) -> None:
        x = _first_tensor_arg(args, kwargs)
        if x is None or not isinstance(output, torch.Tensor):
            return
        # Read now: `functional_call` (masks), parametrizations and pruning swap what the module
        # uses only for the duration of the call. A weight computed from the parameter (e.g. mask *
        # theta) has another gradient than the parameter, so the rule would be wrong for it.
        direct = {
            name: (i, None)
            for name, i in claims.items()
            if _uses_parameter(getattr(module, name, None), self.params[i])
        }
        self.record(rule, module, x, output, direct)

    def record(self, rule: Rule, module: nn.Module, x: torch.Tensor, out: torch.Tensor, claims) -> None:
        """Record one call of ``rule`` (``claims``: parameter name -> (index, rows))."""
        if not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return
        x_edge = _edge_node(x)
        local, complete = _local_leaves(out.grad_fn, x_edge)
        call = _Call(
            rule,
            module,
            x,
            out,
            out.grad_fn,
            x_edge,
            module.training,
            claims,
            x._version,
            out._version,
            local,
            complete,
        )
        # Registered now, not after the closure: a hook sits on the tensor's grad_fn at registration,
        # so it sees d loss / d out even if later code changes `out` in place (ReLU(inplace=True)).
        call.handle = out.register_hook(functools.partial(self._tensor_hook, call))
        self.calls.append(call)

    def project(self, owner: nn.Module, x, weight, weight_rows, bias, bias_rows) -> torch.Tensor:
        """``F.linear(x, weight[rows], bias[rows])`` inside an attention module, recorded."""
        w = weight if weight_rows is None else weight[weight_rows]
        b = None if bias is None else (bias if bias_rows is None else bias[bias_rows])
        out = torch.nn.functional.linear(x, w, b)
        claims = {}
        if id(weight) in self.index:
            claims["weight"] = (self.index[id(weight)], weight_rows)
        if bias is not None and id(bias) in self.index:
            claims["bias"] = (self.index[id(bias)], bias_rows)
        if claims and torch.is_grad_enabled():
            self.record(LINEAR, owner, x, out, claims)
        return out

    def _tensor_hook(self, call: _Call, grad: torch.Tensor) -> None:
        if not call.active or call.done:
            return
        call.done = True
        if call.bufs:
            call.rule.apply(Call(call.module, call.x, grad, call.bufs, self.scale, self.chunk, self.backend))
        if call.keep:
            call.g = grad
        else:
            call.x = call.out = None  # done: let the input go as soon as autograd does

    # ----------------------------------------------------------------------------- estimation
    def _classify_calls(self, n: int) -> list[_Call]:
        valid = []
        for call in self.calls:
            ids = {id(self.params[i]) for i, _ in call.claims.values()}
            if not call.claims:
                continue
            reason = ""
            if not (call.local_complete and ids <= call.local):
                reason = "its layer call did more than the layer's own ops"
            elif call.x._version != call.x_version:
                reason = "its layer's input was modified in place after the call"
            elif call.rule.accepts(call.module, call.x, n, call.training):
                call.mode = "sample"
            elif (
                n > 1
                and call.out._version == call.out_version
                and call.rule.accepts(call.module, _expand_samples(call.x, call.out, n), n, call.training)
            ):
                call.mode = "broadcast"  # no sample dimension: read at the op that broadcasts it
            else:
                reason = f"its {call.rule.name} call did not fit the rule (samples along dim 0, mode, dtype)"
            if reason:
                for i, _ in call.claims.values():
                    self.failed.setdefault(i, reason)
                continue
            valid.append(call)
        return valid

    def estimate(self, losses: torch.Tensor, closure: Callable[[], torch.Tensor]) -> None:
        n = losses.shape[0]
        valid = self._classify_calls(n)
        stops = {call.out_node for call in valid}
        # Stepping over a call = not entering its output node and walking on from its input; a
        # call's input that is another call's output is stepped over in turn.
        roots = [r for r in (losses.grad_fn, *(call.x_edge for call in valid)) if r not in stops]
        reached: set[int] = set()
        users: dict[Node, list[tuple[Node, int]]] = {}
        kinds: set[str] = set()
        for node, _ in autograd_graph.walk(roots, lambda nd, nr: nd in stops):
            kinds.add(type(node).__name__)
            leaf = autograd_graph.leaf_tensor(node)
            if leaf is not None:
                reached.add(id(leaf))
            for i, (nxt, _) in enumerate(node.next_functions):
                if nxt is not None and (nxt in stops or autograd_graph.leaf_tensor(nxt) is not None):
                    users.setdefault(nxt, []).append((node, i))
        for call in valid:  # leaves a call's own ops reach besides the parameters it claims
            extra = call.local - {id(self.params[i]) for i, _ in call.claims.values()}
            reached |= extra
            for pid in extra & self.index.keys():
                self.failed.setdefault(
                    self.index[pid], "its layer used a tensor computed from it (functional_call, parametrization)"
                )
        leaf_nodes = {
            id(autograd_graph.leaf_tensor(nd)): nd for nd in users if autograd_graph.leaf_tensor(nd) is not None
        }

        uses: dict[int, list[tuple[_Call, str, slice | None]]] = {}
        for call in valid:
            for name, (i, rows) in call.claims.items():
                uses.setdefault(i, []).append((call, name, rows))
        broadcasts: list[_Broadcast] = []
        fallback_params: list[int] = []
        multi: list[int] = []
        for i, p in enumerate(self.params):
            pcalls = uses.get(i, [])
            if id(p) in reached:
                users_of = users.get(leaf_nodes.get(id(p)), [])
                item = self._broadcast_item(users_of, p.shape) if not pcalls else None
                if item is not None:
                    item.param = i
                    broadcasts.append(item)
                else:
                    self.failed.setdefault(i, _use_reason(users_of, pcalls))
                    fallback_params.append(i)
                continue
            if not pcalls:
                continue  # never used: the gradient is zero
            if any(c.mode == "broadcast" for c, _, _ in pcalls):
                if len(pcalls) > 1:
                    self.failed[i] = "used by several calls, one without a sample dimension"
                    fallback_params.append(i)
                continue
            if len(pcalls) == 1 or _disjoint([rows for _, _, rows in pcalls], p.shape[0]):
                for call, name, rows in pcalls:
                    call.bufs[name] = self.acc[i] if rows is None else self.acc[i][rows]
            else:
                multi.append(i)
                for call, _, _ in pcalls:
                    call.keep = True
        for call in valid:
            if call.mode != "broadcast" or not any(j not in fallback_params for j, _ in call.claims.values()):
                continue
            item = self._broadcast_item(users.get(call.out_node, []), call.out.shape)
            if item is None:
                for j, _ in call.claims.values():
                    self.failed.setdefault(j, "its output enters the batch through an op other than add/mul/expand")
                    fallback_params.append(j)
                continue
            item.call = call
            call.bufs = {name: self.acc[j] for name, (j, _) in call.claims.items() if j not in fallback_params}
            broadcasts.append(item)

        vmapped = self._plan_vmap(sorted(set(fallback_params)), losses, stops)
        graph_params = [i for i in sorted(set(fallback_params)) if not any(i in ids for _, ids in vmapped)]
        # The other modules' recorded inputs and outputs are not needed: let autograd free them.
        self.module_calls = {mc.module: mc for mc, _ in vmapped}
        for call in self.calls:
            if call.mode != "sample" or not (call.bufs or call.keep):
                if call.mode != "broadcast":
                    call.drop()

        inputs: list[torch.Tensor] = []
        for call in valid:
            if call.mode == "sample" and (call.bufs or call.keep):
                call.active = True
                # An output changed in place since the call is no longer the tensor the hook saw;
                # asking for a parameter's gradient instead still runs the call's node.
                ok = call.out._version == call.out_version
                inputs.append(call.out if ok else self.params[next(iter(call.claims.values()))[0]])
        for item in broadcasts:
            inputs.append(self.params[item.param] if item.param is not None else item.call.out)
        self._hook_broadcasts(broadcasts, n)
        first_module_output = len(inputs)
        for mc, _ in vmapped:
            inputs.extend(mc.grad_outputs)
        retain = bool(fallback_params or broadcasts)
        grads = []
        if inputs:
            grads = torch.autograd.grad(
                losses, inputs, grad_outputs=torch.ones_like(losses), retain_graph=retain, allow_unused=True
            )
        for call in valid:
            call.active = False
        for i in multi:
            self._sum_over_calls(i, uses[i], n)
        for item in broadcasts:
            if item.failed:
                ids = [item.param] if item.param is not None else [j for j, _ in item.call.claims.values()]
                for j in ids:
                    self.failed.setdefault(j, f"{type(item.node).__name__} does not broadcast it over samples")
                graph_params.extend(ids)

        offset = first_module_output
        for mc, ids in vmapped:
            outs = grads[offset : offset + len(mc.grad_outputs)]
            offset += len(mc.grad_outputs)
            if not self._run_vmap(mc, ids, outs, n):
                graph_params.extend(ids)
        if graph_params:
            self._run_graph(sorted(set(graph_params)), losses, kinds, closure)

    def _broadcast_item(self, users_of, shape) -> _Broadcast | None:
        """The broadcasting op through which a tensor of ``shape`` (no sample dim) enters the batch."""
        if len(users_of) != 1:
            return None
        node, index = users_of[0]
        if broadcast.operand_rule(node, index) is None:
            return None
        return _Broadcast(node, index, shape)

    def _hook_broadcasts(self, items: list[_Broadcast], n: int) -> None:
        by_node: dict[Node, list[_Broadcast]] = {}
        for item in items:
            by_node.setdefault(item.node, []).append(item)
        for node, group in by_node.items():
            self.node_handles.append(node.register_prehook(functools.partial(self._broadcast_hook, group, n, [False])))

    def _broadcast_hook(self, items: list[_Broadcast], n: int, fired: list[bool], grad_outputs):
        if fired[0] or grad_outputs[0] is None:
            return None
        fired[0] = True
        go = grad_outputs[0]
        go = go.float() if go.dtype in (torch.float16, torch.bfloat16) else go
        for item in items:
            g = broadcast.operand_rule(item.node, item.index)(go)
            per_sample = broadcast.per_sample_operand(g, item.shape, n)
            if per_sample is None:
                item.failed = True
                continue
            if item.param is not None:
                shape = self.params[item.param].shape
                fallback._accumulate([self.acc[item.param]], [per_sample.reshape(n, *shape)], self.scale, self.backend)
            else:
                call = item.call
                x = _expand_samples(call.x, call.out, n, leading=len(item.shape) == go.dim())
                call.rule.apply(Call(call.module, x, per_sample, call.bufs, self.scale, self.chunk, self.backend))
        return None

    def _sum_over_calls(self, i: int, pcalls, n: int) -> None:
        """Per-sample gradients of parameter ``i`` summed over the calls that use it, then squared."""
        p = self.params[i]
        dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
        samples = sample_block(self.chunk, p.numel())
        for s in range(0, n, samples):
            e = min(n, s + samples)
            total = torch.zeros(e - s, *p.shape, dtype=dtype, device=p.device)
            for call, name, rows in pcalls:
                if call.g is None:
                    continue  # no gradient reached this call
                c = Call(call.module, call.x, call.g, {}, self.scale, self.chunk, self.backend)
                part = call.rule.per_sample(c, s, e, (name,))[name]
                if rows is None:
                    total += part
                else:
                    total[:, rows] += part
            fallback._accumulate([self.acc[i]], [total], self.scale, self.backend)

    # ------------------------------------------------------------------------------- fallbacks
    def _plan_vmap(self, ids: list[int], losses: torch.Tensor, stops: set[Node]):
        """For fallback parameters: the smallest module call holding every use of each, if any.
        Returns ``[(module call, parameter indices)]``."""
        if not ids:
            return []
        n = losses.shape[0]
        parents: dict[nn.Module, nn.Module] = {}
        for m in self.module.modules():
            for child in m.children():
                parents.setdefault(child, m)
        owners = {}
        for m in self.module.modules():
            for p in m._parameters.values():
                if p is not None:
                    owners.setdefault(id(p), m)
        plans: dict[nn.Module, list[int]] = {}
        outside: dict[nn.Module, set[int] | None] = {}
        for i in ids:
            m = owners.get(id(self.params[i]))
            while m is not None:
                if m not in outside:
                    outside[m] = self._outside_leaves(m, losses, n)
                if outside[m] is not None and id(self.params[i]) not in outside[m]:
                    plans.setdefault(m, []).append(i)
                    break
                m = parents.get(m)
        return [(self.module_calls[m], idx) for m, idx in plans.items()]

    def _outside_leaves(self, m: nn.Module, losses: torch.Tensor, n: int) -> set[int] | None:
        """Leaves reached from the losses without entering ``m``'s single call (None when ``m``
        cannot be re-run per sample: not called once, outputs without samples, inputs changed)."""
        mc = self.module_calls.get(m)
        if mc is None or mc.calls != 1 or any(sub in self.swapped for sub in m.modules()):
            return None
        for t, node, version in zip(mc.outputs, mc.nodes, mc.versions, strict=True):
            if t.requires_grad and (t.dim() == 0 or t.shape[0] != n or t._version != version or node is None):
                return None
        if any(t._version != v for t, v in mc.in_versions):
            return None
        stops = {node for node in mc.nodes if node is not None}
        roots = [losses.grad_fn, *(_edge_node(t) for t, _ in mc.in_versions)]
        return autograd_graph.reached_leaves(roots, lambda nd, nr: nd in stops)

    def _run_vmap(self, mc: _ModuleCall, ids: list[int], grads, n: int) -> bool:
        names = {}
        local = {id(p): name for name, p in mc.module.named_parameters(remove_duplicate=False)}
        for i in ids:
            names[local[id(self.params[i])]] = self.params[i]
        positions = [j for j, t in enumerate(mc.outputs) if t.grad_fn is not None]
        present = [k for k, g in enumerate(grads) if g is not None]
        label = self.labels.get(mc.module, type(mc.module).__name__) or "<module>"
        try:
            fallback.module_vmap(
                mc.module,
                mc.args,
                mc.kwargs,
                [positions[k] for k in present],
                [grads[k] for k in present],
                names,
                [self.acc[i] for i in ids],
                n,
                self.scale,
                self.chunk,
                self.backend,
            )
        except Exception as exc:  # a forward vmap cannot batch: the graph fallback takes over
            for i in ids:
                self.failed[i] = f"{self.failed.get(i, 'no rule')}; vmap over {label!r} failed: {type(exc).__name__}"
            return False
        for i in ids:
            self._warn(i, f"torch.func vmap(grad) over module {label!r}, chunks of {self.chunk} samples")
        return True

    def _run_graph(self, ids: list[int], losses, kinds: set[str], closure) -> None:
        how = f"batched backward passes of {self.chunk} one-hot rows through the whole graph"
        if fallback.has_fused_attention(kinds):
            losses = fallback.rerun_with_math_attention(closure)
            how += " (closure run again with the math attention backend)"
        for i in ids:
            self._warn(i, how)
        fallback.graph_batched(
            losses, [self.params[i] for i in ids], [self.acc[i] for i in ids], self.scale, self.chunk, self.backend
        )

    def _warn(self, i: int, how: str) -> None:
        name = self.names.get(id(self.params[i]), "?")
        owner = name.rpartition(".")[0]
        owner_module = self.module.get_submodule(owner) if owner else self.module
        label = f"{type(owner_module).__name__} {owner!r}" if owner else type(owner_module).__name__
        _warn_once(label, name, self.failed.get(i, "no rule"), how)


def _disjoint(rows: list[slice | None], size: int) -> bool:
    """Whether row ranges (None: all rows) cover each row at most once."""
    if any(r is None for r in rows):
        return False
    spans = sorted(r.indices(size)[:2] for r in rows)
    return all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def _expand_samples(x: torch.Tensor, out: torch.Tensor, n: int, leading: bool | None = None) -> torch.Tensor:
    """A call's input without a sample dimension, repeated over ``n`` samples as a view: its
    leading size-1 dimension expanded (``leading``, default: when the output has one), or a new
    leading dimension."""
    if leading is None:
        leading = out.dim() > 0 and out.shape[0] == 1
    if leading:
        return x.expand(n, *x.shape[1:]) if x.dim() > 0 and x.shape[0] == 1 else x.unsqueeze(0).expand(n, *x.shape)
    return x.unsqueeze(0).expand(n, *x.shape)


def _use_reason(users_of, pcalls) -> str:
    ops = sorted({type(node).__name__ for node, _ in users_of})
    where = f"used by {', '.join(ops)}" if ops else "used outside the recorded layer calls"
    if pcalls:
        return f"{where} besides its layer calls"
    return where


def _attention_forward(module, *args, run: _Run, **kwargs):
    """The patched forward of an ``nn.MultiheadAttention`` during estimation."""
    names = ("query", "key", "value")
    qkv = [args[i] if i < len(args) else kwargs.get(names[i]) for i in range(3)]
    rest = dict(zip(("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal"), args[3:]))
    rest.update({k: v for k, v in kwargs.items() if k not in names})
    if not all(isinstance(t, torch.Tensor) for t in qkv) or not attention.covers(*qkv):
        return type(module).forward(module, *args, **kwargs)
    return attention.attention_forward(module, functools.partial(run.project, module), *qkv, **rest)
