"""The training engine: the :class:`Trainer` (fit loop, step modes, training state, evaluation),
its batch sources, checkpoint files and data-parallel collectives."""

from .trainer import Trainer

__all__ = ["Trainer"]
