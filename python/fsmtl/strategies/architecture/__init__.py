"""Architectures: how each task uses the shared trunk, one axis of the composed methods. Besides
the plain shared trunk (hard parameter sharing), per-task modulation of the trunk's activations:
squeeze-and-excitation (SE), task routing (TR) and maximum roaming (MR). Shared weights stay dense;
each task sees its own channel gates or unit masks, and a weighting (:mod:`..weighting`) decides
how the task gradients of the shared weights combine (:class:`~..composed.Composed`)."""
