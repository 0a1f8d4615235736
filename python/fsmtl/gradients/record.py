"""What the trunk forwards of one step leave for that step's masked backward."""

from __future__ import annotations

import torch
from torch import nn


class ForwardRecord:
    """The record of one step's trunk forwards, for :func:`fsmtl.masked_multitask_backward`.

    Pass the same record to every forward of a step (``MultiTaskModel.forward(..., record=r)`` or
    ``features(..., record=r)``) and then to the step's masked backward (``record=r``): nothing is
    stored on the model, and the record (with the part of the graph it holds) is freed with the
    step. Each forward with grad enabled starts over what the previous one left (the backward uses
    the last forward's), and counts itself in :attr:`trunk_forwards`.

    Args:
        linear_calls: record the masked ``nn.Linear`` calls of unmasked forwards, for the fused
            Linear weight gradient of the masked backward (they keep their inputs and outputs, so
            the forward's graph lives as long as the record).

    Attributes:
        trunk_forwards: trunk forwards with grad enabled (1: every task's loss shares one graph).
        boundary: the inputs of the first masked module the last forward called, when the model
            leaves trunk parameters outside the masks (empty otherwise): the layers below it can
            then run their backward once instead of once per task.
        linears: the masked ``nn.Linear`` calls of the last (unmasked) forward, one entry per call:
            ``(index of the weight in masked_parameters(), input, output, output's version counter
            at the call)``.
        unsharded: of a model sharded with FSDP2, the full (unsharded) trunk parameters the
            forwards used, by name in ``trunk.named_parameters()``: the tensors autograd
            accumulates the step's gradients into before FSDP reduce-scatters them.
    """

    def __init__(self, *, linear_calls: bool = True) -> None:
        self.linear_calls = bool(linear_calls)
        self.trunk_forwards = 0
        self.boundary: tuple[torch.Tensor, ...] = ()
        self.linears: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []
        self.unsharded: dict[str, torch.Tensor] = {}

    def start_forward(self) -> None:
        """A trunk forward with grad enabled begins: it replaces what the previous one left."""
        self.trunk_forwards += 1
        self.boundary = ()
        self.linears = []
        self.unsharded = {}

    def see_inputs(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the masked modules: the first call's tensor inputs with a graph."""
        if not self.boundary:
            self.boundary = tuple(a for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None)

    def unsharded_hook(self, prefix: str):
        """Forward pre-hook of a trunk module of a sharded model: its own parameters as the forward
        sees them (unsharded by FSDP's pre-forward, which runs first)."""

        def hook(module: nn.Module, args: tuple) -> None:
            for name, p in module.named_parameters(recurse=False):
                self.unsharded[prefix + name] = p

        return hook

    def linear_hook(self, index: int):
        """Forward hook of the masked ``nn.Linear`` whose weight is masked parameter ``index``."""

        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
                self.linears.append((index, args[0].detach(), out, out._version))

        return hook
