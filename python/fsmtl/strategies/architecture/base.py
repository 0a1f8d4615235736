"""The architecture interface and the common machinery of SE, TR and MR: forward hooks on the
trunk's modulation points that gate each point's output channels (or units) by the running task."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from ..base import TrainingContext

#: Modules whose outputs are modulation points when the trunk names none.
ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)


def modulation_points(trunk: nn.Module) -> list[str]:
    """Names of the trunk modules whose outputs are modulated per task: ``trunk.modulation_points``
    when the trunk defines it (the backbones of :mod:`fsmtl.models`: the output of each conv
    block), else every activation module (:data:`ACTIVATIONS`) used once per forward."""
    names = getattr(trunk, "modulation_points", None)
    if names is not None:
        return list(names)
    return [n for n, m in trunk.named_modules() if isinstance(m, ACTIVATIONS)]


class Architecture(ABC):
    """How each task uses the shared trunk: the per-task part of a composed method
    (:class:`~fsmtl.strategies.composed.Composed`), which a weighting completes with the rule that
    combines the task gradients of the shared weights.

    An architecture may own parameters of its own that each belong to one task
    (:meth:`parameters`, e.g. SE's per-task modules): the weighting gives them their task's
    gradient, as it does the heads, and the architecture steps them itself
    (:meth:`after_optimizer_step`).
    """

    @abstractmethod
    def bind(self, context: TrainingContext) -> None:
        """Attach to the bound model (hooks, per-task state); called before any step."""

    def parameters(self) -> list[torch.Tensor]:
        """The architecture's own trainable tensors, each belonging to one task (none here)."""
        return []

    def updates_at(self, epoch: int, step: int, epoch_start: bool) -> bool:
        """True when :meth:`on_step` at this position changes the per-task routing."""
        return False

    def on_step(self, epoch: int, step: int, epoch_start: bool) -> None:  # noqa: B027 (optional hook)
        """Called before every step (maximum roaming moves its masks here)."""

    def after_optimizer_step(self) -> None:  # noqa: B027 (optional hook)
        """Called right after the model's optimizer step (SE steps its own optimizer here)."""

    def state_dict(self) -> dict:
        """The architecture's own state for a checkpoint."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; called after :meth:`bind`."""
        if state:
            raise ValueError(f"{type(self).__name__} has no state, got keys {sorted(state)}")


class ActivationModulation(Architecture):
    """Task ``t``'s forward modulated at every point of the trunk by :meth:`modulate`.

    At :meth:`bind`, two samples of task 0 run through the trunk (eval mode, no grad) to find
    each point's channel count (dim 1 of its output); :meth:`build` then creates the per-task
    state. The hooks read ``model.current_task``, which ``MultiTaskModel.forward(x, t)`` sets;
    a training-mode forward with gradients but no task (``model.features(x)``) is an error, since
    it would silently train the dense trunk.

    Args:
        points: names of trunk modules to modulate (default: :func:`modulation_points`).
    """

    def __init__(self, points: Sequence[str] | None = None) -> None:
        self.points = list(points) if points is not None else None
        self.channels: list[int] | None = None
        self._hooks: list = []

    def bind(self, context: TrainingContext) -> None:
        self.context = context
        trunk = context.model.trunk
        if self.points is None:
            self.points = modulation_points(trunk)
        modules = dict(trunk.named_modules())
        unknown = [p for p in self.points if p not in modules]
        if unknown or not self.points:
            raise ValueError(f"modulation points must name trunk modules; unknown {unknown} (of {len(modules)})")
        for h in self._hooks:
            h.remove()
        if self.channels is None and context.has_data:
            # Without data (a state loaded before fit) the per-task state is built from the saved
            # channel counts instead (load_state_dict).
            self.channels = self._probe(context, [modules[p] for p in self.points])
            self._build()
        self._hooks = [modules[p].register_forward_hook(self._hook(i)) for i, p in enumerate(self.points)]

    def _build(self) -> None:
        like = next(self.context.model.trunk.parameters())
        self.build(self.channels, len(self.context.tasks), like.device, like.dtype)

    def state_dict(self) -> dict:
        return {"channels": self.channels, "own": self.own_state()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"channels", "own"}:
            raise ValueError(f"not the state of {type(self).__name__}: keys {sorted(state)}")
        if self.channels is None:
            self.channels = list(state["channels"])
            self._build()
        elif list(state["channels"]) != self.channels:
            raise ValueError(f"the state has channels {state['channels']}, this trunk's points have {self.channels}")
        self.load_own_state(state["own"])

    @abstractmethod
    def own_state(self) -> dict:
        """The per-task state (masks, modules) for :meth:`state_dict`."""

    @abstractmethod
    def load_own_state(self, state: dict) -> None:
        """Restore :meth:`own_state`."""

    @staticmethod
    def _probe(context: TrainingContext, modules: list[nn.Module]) -> list[int]:
        found: dict[int, int] = {}

        def record(index: int):
            def hook(module, inputs, output) -> None:
                found.setdefault(index, output.shape[1])

            return hook

        hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(modules)]
        trunk = context.model.trunk
        was_training = trunk.training
        try:
            trunk.eval()
            with torch.no_grad():
                trunk(context.sample(0, 2)[0])
        finally:
            trunk.train(was_training)
            for h in hooks:
                h.remove()
        missing = [i for i in range(len(modules)) if i not in found]
        if missing:
            raise ValueError(f"modulation points {missing} did not run in the trunk's forward")
        return [found[i] for i in range(len(modules))]

    def _hook(self, index: int):
        def hook(module, inputs, output):
            task = self.context.model.current_task
            if task is None:
                if module.training and torch.is_grad_enabled():
                    raise RuntimeError(
                        f"{type(self).__name__} modulates the trunk per task: run model(x, task), not model.features(x)"
                    )
                return None
            return self.modulate(index, task, output)

        return hook

    @staticmethod
    def expand(gate: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """``gate`` ``[C]`` or ``[N, C]`` shaped to broadcast over ``output`` ``[N, C, ...]``."""
        gate = gate.to(output.dtype)
        if gate.dim() == 1:
            gate = gate.unsqueeze(0)
        return gate.reshape(*gate.shape, *[1] * (output.dim() - 2))

    @abstractmethod
    def build(self, channels: list[int], num_tasks: int, device: torch.device, dtype: torch.dtype) -> None:
        """Create the per-task state for points with ``channels[i]`` channels."""

    @abstractmethod
    def modulate(self, index: int, task: int, output: torch.Tensor) -> torch.Tensor:
        """Point ``index``'s output in task ``task``'s forward."""
