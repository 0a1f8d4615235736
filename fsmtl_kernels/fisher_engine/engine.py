"""``sum_grad_squared``: exact ``sum_n (d loss_n / d p)**2`` for every parameter of a module.

How it works (one forward, one batched backward, plus chunked backward passes only for the
parameters no rule covers):

1. Forward hooks on the submodules that own requested parameters and have an exact rule
   (:mod:`.rules`) keep each call's input and put a tensor hook on its output. Calls that autograd
   does not record (a ``no_grad`` pass for the predicted label) are ignored.
2. After the closure, each such module is checked: called exactly once, its input unchanged
   since, samples along dim 0, and every requested parameter of it used exactly once in the whole
   autograd graph (a walk of the graph from the losses), inside that very call (a short walk from
   the call's output back to its input). Module reuse, weight tying, functional use of a module's
   parameter elsewhere (``nn.MultiheadAttention``'s ``out_proj``), and calls without samples along
   dim 0 fail the check and send the module's parameters to the fallback. So does a call in
   which the tensor the module uses is not the parameter itself (or a same-layout view of it):
   a weight computed from the parameter inside the call (``mask * theta`` through
   ``torch.func.functional_call``, parametrizations, pruning) has another gradient.
3. One ``torch.autograd.grad`` of ``sum_n loss_n`` w.r.t. the checked modules' outputs (weight
   gradients are never formed). Its tensor hooks receive ``d loss_n / d out_n`` row by row and
   run the layer rule at once, so the gradients are dropped layer by layer.
4. Fallback: ``torch.autograd.grad(losses, params, grad_outputs=<one-hot rows>,
   is_grads_batched=True)`` for ``chunk_size`` samples at a time, squared and summed by
   :func:`fsmtl_kernels.fisher_accumulate`; memory ``O(chunk_size * P_fallback)``.

BatchNorm: in train mode it normalizes with statistics of the whole batch, so sample ``n``'s loss
depends on every sample and "per-sample gradient" has no single meaning. The estimate therefore
uses eval-mode (running) statistics: ``eval_mode=True`` (the default) runs the closure with
``module.eval()`` and restores every submodule's previous mode afterwards. A BatchNorm that would
still use batch statistics (``eval_mode=False`` on a module in train mode, or
``track_running_stats=False``) is rejected with a ``ValueError``. ``eval_mode`` acts on
``module`` only; a BatchNorm outside it (in a task head) that the closure runs with batch
statistics is detected by a global forward hook and also rejected. Other cross-sample layers
outside the known ones cannot be detected: the closure's contract is that sample ``n``'s loss
depends only on sample ``n``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import autograd_graph, backends
from .._checks import GRAD_DTYPES, check_scale
from ..fisher_accumulate import fisher_accumulate
from .rules import Call, Rule, find_rule

# A call's own ops (between its output and its input) are a handful of autograd nodes; a walk that
# goes further has left the call (its input had no grad_fn to stop at) and proves nothing.
_MAX_LOCAL_NODES = 32


@dataclass(eq=False)
class _Site:
    """One rule-covered module: its requested parameters and what its single call saw."""

    module: nn.Module
    rule: Rule
    params: dict[str, int]  # attribute name -> index into the requested params
    calls: int = 0
    x: torch.Tensor | None = None
    x_version: int = 0
    out: torch.Tensor | None = None
    out_version: int = 0
    training: bool = False
    local_params: set[int] = field(default_factory=set)  # id() of parameters used inside the call
    local_complete: bool = False
    direct: bool = False  # at the call, each requested parameter was the tensor the module used
    tensor_hook: torch.utils.hooks.RemovableHandle | None = None
    active: bool = False  # set once the checks pass: only then does the tensor hook run the rule

    def drop(self) -> None:
        if self.tensor_hook is not None:
            self.tensor_hook.remove()
        self.x = self.out = self.tensor_hook = None


def _local_params(out: torch.Tensor, x: torch.Tensor) -> tuple[set[int], bool]:
    """id() of the leaf tensors reached from ``out`` without passing through ``x``'s grad_fn, and
    whether the walk stayed within :data:`_MAX_LOCAL_NODES` nodes (a longer walk left the call)."""
    stop = x.grad_fn
    found: set[int] = set()
    inner = 0
    for node, _ in autograd_graph.walk([out.grad_fn], lambda n, nr: n is stop):
        leaf = autograd_graph.leaf_tensor(node)
        if leaf is not None:
            found.add(id(leaf))
            continue
        inner += 1
        if inner > _MAX_LOCAL_NODES:
            return found, False
    return found, True


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
    Linear (2-D and sequence inputs), Conv1d/Conv2d, Embedding, LayerNorm, RMSNorm, GroupNorm and
    eval-mode BatchNorm use exact layer rules; any other parameter (other module types, parameters
    owned directly by a container, reused modules, tied weights) uses a chunked
    ``is_grads_batched`` fallback. See :mod:`fsmtl_kernels.fisher_engine.engine` for the details.

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
        chunk_size: samples per chunk for the fallback and the sequence/conv rules; memory grows
            with it, Python overhead shrinks.
        eval_mode: run the closure with ``module.eval()`` (BatchNorm on running statistics,
            dropout off), restoring every submodule's mode afterwards.
        backend: ``"auto" | "reference" | "triton" | "cpp"`` for the accumulation kernels.

    Returns:
        float32 tensors shaped like ``params`` (``out`` itself when given). ``.grad`` of every
        parameter is left untouched.
    """
    params, out = _check_args(module, closure, params, out, scale, chunk_size, eval_mode, backend)
    scale = float(scale)
    index = {id(p): i for i, p in enumerate(params)}
    device = params[0].device
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=device) for p in params]

    # Which parameter each requested index belongs to: a rule site, or the fallback. A parameter
    # owned by two modules (tied weights) is never a rule parameter.
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m._parameters.values():
            if p is not None:
                owners[id(p)] = owners.get(id(p), 0) + 1
    sites: list[_Site] = []
    for m in module.modules():
        rule = find_rule(m)
        if rule is None:
            continue
        mine = {
            name: index[id(p)]
            for name, p in m._parameters.items()
            if name in ("weight", "bias") and p is not None and id(p) in index and owners[id(p)] == 1
        }
        if mine:
            sites.append(_Site(m, rule, mine))

    modes = [(m, m.training) for m in module.modules()]
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        if eval_mode:
            module.eval()
        _check_batch_norms(module, eval_mode)
        for site in sites:
            hook = _make_forward_hook(site, params, acc, scale, chunk_size, backend)
            handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
        coupled: list[str] = []
        handles.append(nn.modules.module.register_module_forward_hook(_make_batch_stats_hook(coupled)))
        with torch.enable_grad():
            losses = _check_losses(closure())
        if coupled:
            raise ValueError(
                f"closure ran {coupled[0]} with batch statistics (train mode or track_running_stats=False), "
                "which couples samples so per-sample gradients are undefined; put the layers outside module "
                "in eval mode during estimation"
            )
        for h in handles:
            h.remove()
        handles.clear()
        n = losses.shape[0]
        if n:
            _estimate(losses, params, sites, acc, scale, chunk_size, backend)
    finally:
        for h in handles:
            h.remove()
        for site in sites:
            site.drop()
        for m, training in modes:
            m.training = training
    if out is None:
        return acc
    for o, a in zip(out, acc, strict=True):
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


def _make_forward_hook(site: _Site, params, acc, scale, chunk, backend):
    def hook(module, args, kwargs, output):
        if not isinstance(output, torch.Tensor) or output.grad_fn is None:
            return None  # not recorded by autograd (e.g. a no_grad pass for the predicted label)
        site.calls += 1
        if site.calls > 1:  # reused: the per-sample gradient sums over calls; fallback decides
            site.drop()
            return None
        x = _first_tensor_arg(args, kwargs)
        if x is None:
            return None
        site.x, site.x_version = x, x._version
        site.out, site.out_version = output, output._version
        site.training = module.training
        # Read now: `functional_call` (masks), parametrizations and pruning swap what the module
        # uses only for the duration of the call. A weight computed from the parameter (e.g. mask *
        # theta) has another gradient than the parameter, so the rule would be wrong for it.
        site.direct = all(_uses_parameter(getattr(module, name, None), params[i]) for name, i in site.params.items())
        site.local_params, site.local_complete = _local_params(output, x)
        # Registered now, not after the closure: a hook sits on the tensor's grad_fn at registration,
        # so it sees d loss / d out even if later code changes `out` in place (ReLU(inplace=True)).
        site.tensor_hook = output.register_hook(_make_tensor_hook(site, acc, scale, chunk, backend))
        return None

    return hook


def _estimate(losses, params, sites, acc, scale, chunk, backend) -> None:
    n = losses.shape[0]
    uses = autograd_graph.leaf_uses(losses.grad_fn) if losses.grad_fn is not None else {}
    ruled: list[_Site] = []
    for site in sites:
        if site.calls == 0 and all(uses.get(id(params[i]), 0) == 0 for i in site.params.values()):
            continue  # never used: the gradient is zero
        ok = (
            site.calls == 1
            and site.out is not None
            and site.direct
            and site.local_complete
            and site.x._version == site.x_version
            and site.rule.accepts(site.module, site.x, n, site.training)
            and all(
                uses.get(id(params[i]), 0) == 1 and id(params[i]) in site.local_params for i in site.params.values()
            )
        )
        if ok:
            ruled.append(site)
        else:
            site.drop()
    handled = {i for site in ruled for i in site.params.values()}
    fallback = [i for i in range(len(params)) if i not in handled and uses.get(id(params[i]), 0) > 0]

    if ruled:
        inputs = []
        for site in ruled:
            site.active = True
            # An output changed in place since the call is no longer the tensor the hook saw; asking
            # for a parameter's gradient instead still runs the call's node, where the hook sits.
            if site.out._version == site.out_version:
                inputs.append(site.out)
            else:
                inputs.append(params[next(iter(site.params.values()))])
        torch.autograd.grad(
            losses, inputs, grad_outputs=torch.ones_like(losses), retain_graph=bool(fallback), allow_unused=True
        )
        for site in ruled:  # also where the hook did not run: no gradient reached the output
            site.drop()

    if fallback:
        fb_params = [params[i] for i in fallback]
        fb_acc = [acc[i] for i in fallback]
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            onehot = torch.zeros(stop - start, n, dtype=losses.dtype, device=losses.device)
            onehot[torch.arange(stop - start), torch.arange(start, stop)] = 1
            grads = torch.autograd.grad(
                losses, fb_params, grad_outputs=onehot, is_grads_batched=True, retain_graph=stop < n, allow_unused=True
            )
            present = [(f, g) for f, g in zip(fb_acc, grads, strict=True) if g is not None]
            if present:
                fisher_accumulate(
                    [f for f, _ in present],
                    [g if g.dtype in GRAD_DTYPES else g.float() for _, g in present],
                    scale=scale,
                    backend=backend,
                )


def _make_tensor_hook(site: _Site, acc, scale, chunk, backend):
    def hook(grad):
        if not site.active or site.x is None:
            return None
        bufs = {name: acc[i] for name, i in site.params.items()}
        site.rule.apply(Call(site.module, site.x, grad, bufs, scale, chunk, backend))
        site.x = site.out = None  # done: let the input go as soon as autograd does
        return None

    return hook
