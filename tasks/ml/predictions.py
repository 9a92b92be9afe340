"""The evaluate stage's per-example predictions file: labels, predicted classes and their probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.stages.files import PREDICTIONS_FILE


@dataclass(frozen=True)
class Predictions:
    """Per-example test predictions of each model, for paired comparisons (e.g. McNemar's test)."""

    y_true: np.ndarray
    predicted: dict[str, np.ndarray]
    probability: dict[str, np.ndarray]  # of the predicted class

    def correct(self, model: str) -> np.ndarray:
        return self.predicted[model] == self.y_true


def save_predictions(preds: Predictions, directory: Path) -> Path:
    """Store labels as uint8 and predicted-class probabilities as float32, compressed."""
    arrays: dict[str, Any] = {"y_true": preds.y_true.astype(np.uint8)}
    for name in preds.predicted:
        arrays[f"pred_{name}"] = preds.predicted[name].astype(np.uint8)
        arrays[f"prob_{name}"] = preds.probability[name].astype(np.float32)
    path = directory / PREDICTIONS_FILE
    np.savez_compressed(path, **arrays)
    return path


def load_predictions(directory: str | Path) -> Predictions:
    with np.load(Path(directory) / PREDICTIONS_FILE) as npz:
        names = [key.removeprefix("pred_") for key in npz.files if key.startswith("pred_")]
        return Predictions(npz["y_true"], {n: npz[f"pred_{n}"] for n in names},
                           {n: npz[f"prob_{n}"] for n in names})
