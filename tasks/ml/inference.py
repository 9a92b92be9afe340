"""A stored model's outputs on images as checked class probabilities: finite, and softmax applied to logits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.data.mnist import CLASSES


def as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, str]:
    """The model's outputs as class probabilities, and whether they already were ("probabilities") or not ("logits")."""
    if outputs.min() >= 0 and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs, "probabilities"
    # A head trained with from_logits=True is legitimate; softmax gives the same argmax and real probabilities.
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True), "logits"


def predict_with(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Load a `.keras` file safely and return its class probabilities on `x`."""
    from tasks.ml.saved import load_model  # Keras is imported only when a model is needed

    # Predicting needs no optimizer, loss or compiled training step.
    return probabilities(load_model(path, compile=False), x, Path(path))


def probabilities(model: Any, x: np.ndarray, path: Path) -> tuple[np.ndarray, str]:
    """A model's class probabilities on flat 784-vectors `x` (reshaped to the input it declares), checked finite."""
    shape = tuple(model.input_shape[1:])
    outputs = np.asarray(model.predict(x.reshape((len(x), *shape)), batch_size=1024, verbose=0), dtype=np.float64)
    if outputs.shape != (len(x), CLASSES):
        raise ValueError(f"{path.name}: expected outputs of shape {(len(x), CLASSES)}, got {outputs.shape}")
    check_finite(outputs, path)
    return as_probabilities(outputs)


def check_finite(outputs: np.ndarray, path: Path) -> None:
    """Refuse a model whose outputs hold NaN or infinity: its argmax would be an arbitrary class."""
    from tasks.ml.saved import ModelError

    bad = int(np.sum(~np.isfinite(outputs).all(axis=1)))
    if bad:
        raise ModelError(f"{path}: the model outputs NaN or infinite values for {bad} of {len(outputs)} images; "
                         "it cannot be scored or served (retrain it, or roll back to the previous champion)")
