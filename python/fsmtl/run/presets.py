"""Run presets (``fsmtl run --preset NAME``): a benchmark with the paper's model and training
settings, each number with where it comes from. Options given on the command line win over the
preset; the preset wins over the benchmark's run defaults (:attr:`BenchmarkEntry.run_defaults`),
which win over :class:`~fsmtl.run.experiment.ExperimentConfig`'s defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..data.qm9 import QM9_CPU_SETTINGS


@dataclass(frozen=True)
class Preset:
    """One preset: ``benchmark``, its options (the user adds the data paths with ``-o``), run
    settings (:class:`~fsmtl.run.experiment.ExperimentConfig` fields) and the source of each value."""

    benchmark: str
    description: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    benchmark_options: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)


_MR = (
    "the maximum-roaming CelebA harness (Pascal et al., AAAI 2021, code lucaspascal/"
    "Maximum-Roaming-Mutli-Task-Learning) as this project read it; not re-checked against that code offline"
)
_MTAN = (
    "MTAN (Liu, Johns and Davison, CVPR 2019) and LibMTL's Cityscapes setting, from our reading of "
    "the MTAN paper; not re-checked offline"
)

_NASH = (
    "Nash-MTL (Navon et al., ICML 2022), experiments/quantum_chemistry, which FAMO, FairGrad, Aligned-MTL and "
    "LibMTL follow, as this project read it; not re-checked against that code offline"
)

PRESETS: dict[str, Preset] = {
    "celeba-paper": Preset(
        "celeba-groups",
        "CelebA, 40 attributes in 8 multi-label task groups, ResNet-18 at 64x64, batch 256, Adam 1e-4, 40 epochs, BCE",
        settings={"model": "resnet18", "batch_size": 256, "lr": 1e-4, "epochs": 40},
        benchmark_options={"image_size": 64},
        sources={
            "model": f"ResNet-18: {_MR}",
            "image_size": f"64x64: {_MR}",
            "batch_size": f"256: {_MR}",
            "lr": f"Adam 1e-4: {_MR}",
            "epochs": f"40: {_MR}",
            "tasks": f"8 groups of 5 attributes, BCE per attribute: {_MR}; the FSMTL paper also counts 8 CelebA tasks; "
            "the grouping is ours (fsmtl.data.celeba_groups.GROUPS)",
        },
    ),
    "cityscapes-paper": Preset(
        "cityscapes",
        "Cityscapes 128x256, 7-class segmentation + depth, SegNet encoder-decoder, batch 8, Adam 1e-4, 200 epochs",
        settings={"model": "segnet", "batch_size": 8, "lr": 1e-4, "epochs": 200},
        sources={
            "model": f"SegNet with MTAN's layout and heads: {_MTAN}",
            "resolution": "128x256 and 7 classes: the preprocessed MTAN/LibMTL arrays the loader reads",
            "batch_size": f"8: {_MTAN}",
            "lr": f"Adam 1e-4: {_MTAN}",
            "epochs": f"200: {_MTAN}",
        },
    ),
    "qm9-paper": Preset(
        "qm9",
        "QM9, 11 targets, Nash-MTL's protocol: MPNN on the complete graph with distances, 110k/10k/10k molecules, "
        "batch 120, Adam 1e-3, 300 epochs (for a GPU)",
        settings={"model": "mpnn-complete", "batch_size": 120, "lr": 1e-3, "epochs": 300, "lr_schedule": "plateau"},
        benchmark_options={"n_train": 110000, "n_val": 10000, "n_test": 10000},
        sources={
            "model": f"PyG's NNConv + GRU + Set2Set MPNN, width 64, on the complete graph with distances: {_NASH}",
            "split": f"110,000 / 10,000 / 10,000 molecules: {_NASH}",
            "batch_size": f"120: {_NASH}",
            "lr": f"Adam 1e-3: {_NASH}",
            "lr_schedule": f"ReduceLROnPlateau (factor 0.7, patience 5, min 1e-5) on a validation every epoch, and the "
            f"test of the best validation epoch: {_NASH}, which steps on the validation Delta M% (here: the validation "
            "loss, the mean standardised MSE over the targets)",
            "epochs": f"300: {_NASH}",
            "targets": f"the 11 targets in PyG's units, standardised with training statistics: {_NASH}",
        },
    ),
    "qm9": Preset(
        "qm9",
        "QM9, 11 targets, sized for 2 CPU cores: MPNN on the bonded graph, 500/250/500 molecules, batch 120, "
        "Adam 1e-3, 3 epochs, keep ratio 0.5",
        settings={k: v for k, v in QM9_CPU_SETTINGS.items() if k != "benchmark_options"},
        benchmark_options=QM9_CPU_SETTINGS["benchmark_options"],
        sources={
            "model": f"the MPNN of {_NASH}, on the bonded graph (10x cheaper per step on CPU than the complete one)",
            "split": "500 / 250 / 500 molecules: ours, so that `fsmtl run --benchmark qm9 --methods stl,mtl,rs,fs` "
            "fits 30 minutes on 2 CPU cores",
            "epochs": "3: ours, for the same reason; far from converged",
            "batch_size": f"120 and Adam 1e-3: {_NASH}",
        },
    ),
    "dkl-mnist-paper": Preset(
        "dkl-mnist",
        "DKL-mnist (MNIST, KMNIST, EMNIST letters; heterogeneous), small CNN, batch 64, Adam 1e-3, 40 epochs",
        settings={"model": "cnn", "batch_size": 64, "lr": 1e-3, "epochs": 40},
        sources={
            "tasks": "3 heterogeneous tasks on MNIST, KMNIST, EMNIST letters: the FSMTL paper (Sec. 4, Table 1)",
            "model": "the FSMTL paper's main text gives no DKL-mnist architecture or optimiser; "
            "model, batch size, learning rate and epochs are this project's defaults",
        },
    ),
}


def resolve_settings(settings: dict, given: set[str], preset: str | None) -> dict:
    """``settings`` (ExperimentConfig fields from the command line, with ``benchmark_options``)
    with the preset's values and then the benchmark's run defaults filled in for every field not
    in ``given`` (the options typed on the command line)."""
    from ..data import BENCHMARKS

    settings = dict(settings)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        p = PRESETS[preset]
        if "benchmark" in given and settings["benchmark"] != p.benchmark:
            raise ValueError(f"preset {preset!r} runs benchmark {p.benchmark!r}, not {settings['benchmark']!r}")
        settings["benchmark"] = p.benchmark
        settings["benchmark_options"] = {**p.benchmark_options, **settings.get("benchmark_options", {})}
        for key, value in p.settings.items():
            if key not in given:
                settings[key] = value
        given = given | set(p.settings)
    entry = BENCHMARKS.get(settings["benchmark"])
    if entry is not None:
        for key, value in entry.run_defaults.items():
            if key == "benchmark_options":  # option by option, under the ones given with -o
                settings[key] = {**value, **settings.get(key, {})}
            elif key not in given:
                settings[key] = value
    return settings
