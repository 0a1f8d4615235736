"""Tests of fsmtl.metrics against hand-computed values and scikit-learn."""

from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import confusion_matrix

from fsmtl.tasks import TASK_KINDS, Task
from fsmtl.tasks.metrics import (
    METRIC_DIRECTION,
    average_metrics,
    average_rank,
    segmentation_confusion,
    task_metrics,
)

BINARY = Task("b", "binary", 1)
MULTI = Task("m", "multiclass", 3)
REG = Task("r", "regression", 1)
SEG = Task("s", "segmentation", 3)
DEPTH = Task("d", "depth", 1)


def test_binary_hand_computed():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 1.0])  # predictions 1 0 1 0 1
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])  # TP 2, FP 1, FN 1, TN 1
    out = task_metrics(BINARY, logits, targets)
    assert out == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert task_metrics(BINARY, logits[:, None], targets) == out  # [n, 1] logits accepted
    # Logit exactly 0 is negative (threshold 0, strict), and no positive prediction gives precision 0.
    none = task_metrics(BINARY, torch.tensor([0.0, -1.0]), torch.tensor([1.0, 0.0]))
    assert none == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0}


def test_multiclass_macro_hand_computed():
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = torch.nn.functional.one_hot(pred, 3).float() * 3 - 1
    out = task_metrics(MULTI, logits, targets)
    # class 0: P 1/2 R 1/2; class 1: P 2/3 R 1; class 2: P 1 R 1/2.
    precision = (1 / 2 + 2 / 3 + 1) / 3
    recall = (1 / 2 + 1 + 1 / 2) / 3
    f1 = (1 / 2 + 0.8 + 2 / 3) / 3
    assert out == pytest.approx({"accuracy": 4 / 6, "precision": precision, "recall": recall, "f1": f1})


def test_regression():
    out = task_metrics(REG, torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 3.0, 1.0]))
    assert out == pytest.approx({"mse": 10 / 3, "mae": 4 / 3})


def test_segmentation_hand_computed():
    targets = torch.tensor([[[0, 0], [1, -1]], [[2, 2], [1, 0]]])  # 7 labelled pixels
    pred = torch.tensor([[[0, 1], [1, 2]], [[2, 0], [1, 0]]])
    logits = torch.nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()
    out = task_metrics(SEG, logits, targets)
    # class 0: TP 2, FP 1, FN 1 -> 1/2; class 1: TP 2, FP 1, FN 0 -> 2/3; class 2: TP 1, FP 0, FN 1 -> 1/2.
    assert out == pytest.approx({"miou": (1 / 2 + 2 / 3 + 1 / 2) / 3, "pix_acc": 5 / 7})


def test_segmentation_confusion_matches_sklearn_and_skips_absent_classes():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, 9, generator=g)
    targets = torch.randint(-1, 5, (3, 7, 9), generator=g)
    ours = segmentation_confusion(logits, targets, 5)
    valid = targets != -1
    ref = confusion_matrix(targets[valid].numpy(), logits.argmax(1)[valid].numpy(), labels=list(range(5)))
    assert ours.tolist() == ref.tolist()
    # A class in neither targets nor predictions has no IoU and is skipped, not counted as 0.
    task = Task("s", "segmentation", 4)
    one_class = torch.zeros(1, 4, 2, 2)
    one_class[:, 1] = 1.0
    out = task_metrics(task, one_class, torch.ones(1, 2, 2, dtype=torch.int64))
    assert out == {"miou": 1.0, "pix_acc": 1.0}
    with pytest.raises(ValueError, match="no labelled pixel"):
        task_metrics(task, one_class, torch.full((1, 2, 2), -1))
    with pytest.raises(ValueError, match="segmentation targets must be"):
        task_metrics(task, one_class, torch.full((1, 2, 2), 4))


def test_depth_mtan_definition():
    targets = torch.tensor([[[[1.0, 2.0], [0.0, 4.0]]]])
    pred = torch.tensor([[[[1.5, 1.0], [9.0, 4.0]]]])
    out = task_metrics(DEPTH, pred, targets)
    # valid pixels: 1, 2, 4 -> |err| 0.5, 1, 0 ; rel 0.5, 0.5, 0
    assert out == pytest.approx({"abs_err": 1.5 / 3, "rel_err": 1.0 / 3})
    with pytest.raises(ValueError, match="no valid pixel"):
        task_metrics(DEPTH, pred, torch.zeros_like(targets))


def test_shape_and_type_errors():
    with pytest.raises(ValueError, match=r"\[n, 3\] logits"):
        task_metrics(MULTI, torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="same n"):
        task_metrics(BINARY, torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[n, 1, H, W\]"):
        task_metrics(DEPTH, torch.zeros(2, 2, 3, 3), torch.zeros(2, 2, 3, 3))
    with pytest.raises(ValueError, match="NaN"):
        task_metrics(REG, torch.tensor([math.nan]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="0 or 1"):
        task_metrics(BINARY, torch.zeros(2), torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError, match="Task"):
        task_metrics("binary", torch.zeros(2), torch.zeros(2))


def test_every_metric_has_a_direction():
    assert {m for kind in TASK_KINDS.values() for m in kind.metrics} == set(METRIC_DIRECTION)
    assert all(kind.primary_metric in kind.metrics for kind in TASK_KINDS.values())
    assert not METRIC_DIRECTION["abs_err"] and METRIC_DIRECTION["miou"]


def test_average_metrics():
    out = average_metrics([{"accuracy": 0.5, "f1": 0.2}, {"accuracy": 1.0, "f1": 0.4, "extra": 3.0}])
    assert out == pytest.approx({"accuracy": 0.75, "f1": 0.3})
    assert average_metrics([{"miou": 0.5, "pix_acc": 0.9}, {"abs_err": 0.1, "rel_err": 0.3}]) == {}
    with pytest.raises(ValueError, match="at least one"):
        average_metrics([])


def test_average_rank_with_ties_and_directions():
    results = {
        "MTL": {"accuracy": 0.9, "f1": 0.5, "abs_err": 0.2},
        "RS": {"accuracy": 0.8, "f1": 0.5, "abs_err": 0.1},
        "FS": {"accuracy": 0.9, "f1": 0.7, "abs_err": 0.3, "keep_ratio": 0.1},
    }
    ranks = average_rank(results)
    # accuracy: MTL, FS tie for 1-2 -> 1.5 each, RS 3; f1: FS 1, MTL/RS tie 2.5;
    # abs_err (lower is better): RS 1, MTL 2, FS 3.
    assert ranks == pytest.approx({"MTL": (1.5 + 2.5 + 2) / 3, "RS": (3 + 2.5 + 1) / 3, "FS": (1.5 + 1 + 3) / 3})
    assert list(ranks) == ["MTL", "RS", "FS"]
    assert average_rank(results, metrics=["abs_err"]) == {"MTL": 2.0, "RS": 1.0, "FS": 3.0}
    all_tied = average_rank({"a": {"f1": 0.5}, "b": {"f1": 0.5}, "c": {"f1": 0.5}})
    assert all_tied == {"a": 2.0, "b": 2.0, "c": 2.0}
    with pytest.raises(ValueError, match="keep_ratio"):
        average_rank(results, metrics=["keep_ratio"])
    with pytest.raises(ValueError, match="missing for method"):
        average_rank({"a": {"f1": 0.5}, "b": {"mse": 0.5}}, metrics=["f1"])
    with pytest.raises(ValueError, match="no metric"):
        average_rank({"a": {"f1": 0.5}, "b": {"mse": 0.5}})
    with pytest.raises(ValueError, match="NaN"):
        average_rank({"a": {"f1": math.nan}, "b": {"f1": 0.5}})
