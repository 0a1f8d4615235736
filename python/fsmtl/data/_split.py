"""Splitting and standardization shared by the benchmarks and loaders."""

from __future__ import annotations

import math

import numpy as np
import torch
from sklearn.model_selection import train_test_split


def check_fraction(value: float, name: str, *, allow_zero: bool = False) -> float:
    """Return ``value`` as float after checking it lies in (0, 1) (or [0, 1) with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    low_ok = value >= 0 if allow_zero else value > 0
    if not (low_ok and value < 1):
        raise ValueError(f"{name} must be in {'[0, 1)' if allow_zero else '(0, 1)'}, got {value}")
    return float(value)


def _stratify_if_possible(stratify: np.ndarray | None, n: int, test_fraction: float) -> np.ndarray | None:
    """``stratify``, or None where a stratified split cannot exist (a class with < 2 samples, or a side
    smaller than the number of classes, as happens with a tiny ``limit``); then the split is plain random."""
    if stratify is None:
        return None
    counts = np.unique(stratify, return_counts=True)[1]
    n_test = math.ceil(test_fraction * n)
    if counts.min() < 2 or n_test < len(counts) or n - n_test < len(counts):
        return None
    return stratify


def three_way_split(
    n: int, *, val_fraction: float, test_fraction: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split ``range(n)`` into disjoint sorted train/val/test index arrays (int64).

    Stratified by ``stratify`` (one label per sample) when given and possible, so every class keeps
    its share in each split; deterministic given ``seed``.
    """
    index = np.arange(n)
    strat = _stratify_if_possible(stratify, n, test_fraction)
    rest, test = train_test_split(index, test_size=test_fraction, random_state=seed, stratify=strat)
    val_share = val_fraction / (1.0 - test_fraction)
    strat_rest = None if stratify is None else _stratify_if_possible(stratify[rest], len(rest), val_share)
    train, val = train_test_split(rest, test_size=val_share, random_state=seed + 1, stratify=strat_rest)
    return np.sort(train), np.sort(val), np.sort(test)


def carve_validation(
    n: int, *, val_fraction: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``range(n)`` into sorted train and val index arrays, stratified when labels are given and possible."""
    index = np.arange(n)
    strat = _stratify_if_possible(stratify, n, val_fraction)
    train, val = train_test_split(index, test_size=val_fraction, random_state=seed, stratify=strat)
    return np.sort(train), np.sort(val)


def standardize(train: torch.Tensor, *others: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Standardize tensors with the mean and std of ``train`` reduced over ``dims``.

    ``dims=(0,)`` standardizes each feature; ``dims=(0, 2, 3)`` each channel of ``[n, C, H, W]``
    images. Statistics come from ``train`` only, so no information leaks from val/test. A feature
    that is constant in ``train`` (e.g. a border pixel of the digits that is always 0) gets std 1
    instead of 0, so it stays finite. Returns new float32 tensors, ``[train, *others]``.
    """
    train64 = train.to(torch.float64)
    mean = train64.mean(dim=dims, keepdim=True)
    std = train64.std(dim=dims, keepdim=True, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    return [((x.to(torch.float64) - mean) / std).to(torch.float32).contiguous() for x in (train, *others)]
