"""What ``Trainer.fit`` checks before its first step, so that a run that cannot finish stops before
it changes a parameter, with one message that names the culprit:

* the in-memory validation and Fisher data (a ``Split``, or datasets over one), whole;
* trunk parameters frozen (``requires_grad=False``) after the ``MultiTaskModel`` was built: the
  model fixed the task masks over the trunk parameters that were trainable then;
* a model whose parameters' dtype is not the inputs' (without ``amp``);
* a BatchNorm layer that would see one value per channel in a batch of one sample (the last
  batch of an epoch, or one rank's share of it), where torch fails in training mode mid-epoch.
  Such a run is refused; the message names the layer and a batch size that avoids it;
* a resumed mid-epoch state whose epoch ran with another global batch (the position in the
  epoch would point at other samples).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, default_collate

from ..data import Split, backing_split
from ..data.batches import homogeneous_batch, is_map_dataset, task_batch, to_device
from .sources import check_split


def check_fit(trainer, train, val, fisher_data, batch_size: int | None, global_batch: int | None) -> None:
    """Every check of the module docstring; raises ``ValueError`` before anything is trained."""
    for name, data in (("val", val), ("fisher_data", fisher_data)):
        whole = backing_split(data) if data is not None and not isinstance(data, Split) else None
        if whole is not None:
            check_split(whole, trainer.tasks, trainer.homogeneous, name)
    check_frozen_after_build(trainer.model)
    if trainer.epoch_step > 0 and trainer.global_batch is not None and global_batch != trainer.global_batch:
        raise ValueError(
            f"the state stopped epoch {trainer.epoch} after {trainer.epoch_step} steps of global batch "
            f"{trainer.global_batch}; this fit has global batch {global_batch}, so the rest of that epoch would "
            "be other samples: resume with the same batch size and world size"
        )
    sample = _sample(train, trainer.tasks, trainer.homogeneous, trainer.device)
    if sample is None:
        return
    if trainer.amp is None:
        check_dtype(trainer.model, sample)
    smallest = smallest_batch(train, trainer.homogeneous, global_batch, trainer.gradient_sync)
    if smallest == 1:
        check_batchnorm_single(trainer.model, sample, train, global_batch, trainer.gradient_sync)


def check_frozen_after_build(model) -> None:
    """The masked trunk parameters (trainable when the model was built) are still trainable."""
    params = dict(model.trunk.named_parameters())
    frozen = [f"trunk.{n}" for n in model.masked_parameter_names() if not params[n].requires_grad]
    if frozen:
        names = ", ".join(frozen[:4]) + (f" and {len(frozen) - 4} more" if len(frozen) > 4 else "")
        raise ValueError(
            f"{names} got requires_grad=False after the MultiTaskModel was built, which fixed the task masks over "
            "the trunk parameters trainable then: freeze parameters before building the model (or leave their "
            "modules out with masked_modules)"
        )


def check_dtype(model, sample: list[torch.Tensor]) -> None:
    """The inputs' floating dtype is the model's parameters' dtype."""
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return
    for x in sample:
        if x.is_floating_point():
            wrong = [(n, p.dtype) for n, p in named if p.dtype != x.dtype]
            if wrong:
                name, dtype = wrong[0]
                raise ValueError(
                    f"train inputs are {x.dtype} but the model's parameter {name} is {dtype}: convert the model "
                    f"(e.g. model.to({x.dtype})) or the data, or train with amp"
                )
            return


def _sample(data, tasks, homogeneous: bool, device) -> list[torch.Tensor] | None:
    """Up to two inputs per task from data that can be read without consuming it (a ``Split``,
    map-style datasets, loaders over them), on ``device``; None for iterables."""
    whole = data if isinstance(data, Split) else backing_split(data)
    if whole is not None:
        return [to_device(x[:2], device) for x in whole.inputs]
    items = [data] if homogeneous else list(data) if isinstance(data, (list, tuple)) else None
    if items is None:
        return None
    out = []
    for t, d in enumerate(items):
        dataset = d.dataset if isinstance(d, DataLoader) else d
        if not is_map_dataset(dataset) or len(dataset) == 0:
            return None
        batch = default_collate([dataset[i] for i in range(min(2, len(dataset)))])
        if homogeneous:
            x, _ = homogeneous_batch(batch, tasks, "train")
            return [to_device(x, device)] * len(tasks)
        x, _ = task_batch(batch, tasks[t], "train")
        out.append(to_device(x, device))
    return out


def _lengths(data, homogeneous: bool, global_batch: int | None) -> list[tuple[int, int]] | None:
    """``(samples, batch)`` of each loader an epoch draws from, None where unknown."""
    whole = data if isinstance(data, Split) else backing_split(data)
    if whole is not None:
        if not homogeneous:
            return [(global_batch, global_batch)]  # per-task data cycles: every batch is full
        return [(whole.sizes[0], global_batch)]
    items = [data] if homogeneous else list(data) if isinstance(data, (list, tuple)) else []
    out = []
    for d in items:
        if isinstance(d, DataLoader):
            if d.batch_size is None or d.drop_last or not is_map_dataset(d.dataset):
                return None
            # The sampler's length: a DistributedSampler draws this rank's share of the dataset.
            n = len(d.sampler) if hasattr(d.sampler, "__len__") else len(d.dataset)
            out.append((n, d.batch_size))
        elif is_map_dataset(d) and global_batch is not None:
            out.append((len(d), global_batch))
        else:
            return None
    return out or None


def smallest_batch(data, homogeneous: bool, global_batch: int | None, sync) -> int | None:
    """The fewest samples one rank computes a training step on, None when unknown."""
    lengths = _lengths(data, homogeneous, global_batch)
    if not lengths:
        return None
    sizes = set()
    for n, batch in lengths:
        sizes.add(min(n, batch))
        if n % batch:
            sizes.add(n % batch)
    if sync is None or sync.presharded:
        return min(sizes)
    return min(max(1, b // sync.size) for b in sizes)  # a rank with an empty share computes on one sample


def check_batchnorm_single(model, sample, data, global_batch, sync) -> None:
    """Refuse a BatchNorm layer that sees one value per channel in a one-sample batch."""
    norms = {m: name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    if not norms:
        return
    seen: dict[str, int] = {}

    def record(module, inputs):
        shape = inputs[0].shape
        seen.setdefault(norms[module], int(torch.Size(shape[2:]).numel()))

    handles = [m.register_forward_pre_hook(record) for m in norms]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for t, x in enumerate(sample):
                model(x, t)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    single = [name for name, per_sample in seen.items() if per_sample == 1]
    if not single:
        return
    lengths = _lengths(data, True, global_batch) or []
    n = lengths[0][0] if lengths else None
    ranks = f" on {sync.size} ranks" if sync is not None and not sync.presharded else ""
    raise ValueError(
        f"train: a step of this run computes on one sample{' per rank' if ranks else ''} ({n} samples, global batch "
        f"{global_batch}{ranks}), and BatchNorm layer {single[0]} then sees one value per channel, which fails in "
        f"training mode mid-epoch: choose a batch size that leaves no one-sample batch, or drop a sample"
    )
