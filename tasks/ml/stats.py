"""Statistics of test predictions: accuracy with its interval, per-class scores, the confusion matrix, McNemar."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import binomtest

from tasks.data.mnist import CLASSES

# The claim table's order; any other model name follows, alphabetically.
MODEL_ORDER = ("softmax", "ann", "pretrained", "probe")


def accuracy_ci(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `correct / n`.

    Chosen over the normal-approximation (Wald) interval because it stays inside [0, 1]
    and keeps close to its nominal coverage near 0 % and 100 % accuracy, where Wald
    collapses to a zero-width interval; it needs no simulation, unlike a bootstrap.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, {n}], got {correct}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    interval = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int = CLASSES) -> np.ndarray:
    """The k x k count matrix, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels must be two 1-d arrays of one length, got {y_true.shape} and {y_pred.shape}")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{name} has labels outside 0..{k - 1}")
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return counts


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def per_class(conf: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall and F1 of each class; None where a score is undefined (0 / 0)."""
    conf = np.asarray(conf)
    rows = []
    for c in range(conf.shape[0]):
        tp, support, predicted = conf[c, c], conf[c, :].sum(), conf[:, c].sum()
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        if precision is None or recall is None:
            f1 = None
        else:
            # Both zero (no hit at all) is the worst F1, not an undefined one.
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "support": int(support), "predicted": int(predicted),
                     "precision": precision, "recall": recall, "f1": f1})
    return rows


def metrics_for(y_true: np.ndarray, y_pred: np.ndarray, confidence: float, k: int = CLASSES) -> dict[str, Any]:
    """Every JSON-able metric of one model's test predictions."""
    conf = confusion(y_true, y_pred, k)
    n, correct = int(conf.sum()), int(np.trace(conf))
    low, high = accuracy_ci(correct, n, confidence)
    classes = per_class(conf)
    f1s = [c["f1"] for c in classes if c["f1"] is not None]
    return {
        "n": n, "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": classes, "confusion": conf.tolist(),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c trials with p = 1/2."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


def ordered(names: Any) -> list[str]:
    """Model names in claim-table order."""
    names = set(names)
    return [n for n in MODEL_ORDER if n in names] + sorted(names - set(MODEL_ORDER))
