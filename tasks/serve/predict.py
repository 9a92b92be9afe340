"""Classify image files of handwritten digits with a saved model, framing each image as MNIST was built."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.data.images import first_line, prepare
from tasks.data.mnist import CLASSES, PIXELS
from tasks.ml.inference import probabilities

log = logging.getLogger(__name__)




@dataclass(frozen=True)
class Prediction:
    """The predicted digit of one file with its probability, or the one-line reason it has none."""

    path: Path
    digit: int | None
    probability: float | None
    error: str | None = None


def predict(model_path: Path, image_paths: list[Path]) -> list[Prediction]:
    """Predict the digit of every image with the saved Keras model; a bad file gets an error, not an exception."""
    from tasks.ml.saved import load_model  # Keras is imported only when a model is needed, so prepare() stays light

    model = load_model(Path(model_path), compile=False)  # predicting needs no optimizer or loss
    prepared: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, path in enumerate(image_paths):
        try:
            prepared[i] = prepare(Path(path))
        except Exception as exc:  # one bad file must not stop the others
            # Only what is wrong: each prediction names its file.
            errors[i] = first_line(exc).removeprefix(f"{Path(path)}: ")
            # The caller reports each error; a warning here would print it a second time.
            log.debug("predict: %s: %s", path, errors[i])
    x = np.stack(list(prepared.values())) if prepared else np.empty((0, PIXELS), np.float32)
    probs = probabilities(model, x, Path(model_path))[0] if prepared else np.empty((0, CLASSES))
    by_index = dict(zip(prepared, probs, strict=True))
    results = []
    for i, path in enumerate(image_paths):
        if i in errors:
            results.append(Prediction(Path(path), None, None, errors[i]))
        else:
            p = by_index[i]
            results.append(Prediction(Path(path), int(p.argmax()), float(p.max())))
    return results
