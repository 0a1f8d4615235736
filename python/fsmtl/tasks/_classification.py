"""Accuracy, precision, recall and F-score, shared by the binary and multiclass kinds."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, precision_recall_fscore_support

METRICS = {"accuracy": True, "precision": True, "recall": True, "f1": True}


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, average: str) -> dict[str, float]:
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
