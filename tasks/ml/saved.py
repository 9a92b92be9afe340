"""Loading a stored model: safe mode on, and only once its artifact's manifest vouches for the file."""

from __future__ import annotations

from pathlib import Path

import keras

# Imported for their custom objects (TF1's RMSProp, the last-batch loss), which a stored model may name.
from tasks.ml import optimizers, training  # noqa: F401
from tasks.stages.files import AUTOENCODER_FILE
from tasks.store.artifacts import verified_file


class ModelError(ValueError):
    """A model file cannot be used (it will not load safely, or its outputs are not finite); names the file."""


def load_model(path: Path, compile: bool = True) -> keras.Model:
    """Load a stored model with safe mode on, only once its artifact's manifest vouches for the file.

    Importing this module registers the custom objects a model may use.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    verified_file(Path(path))
    try:
        return keras.saving.load_model(path, compile=compile, safe_mode=True)
    except Exception as exc:  # Keras raises many types for a file it cannot or must not load
        if "safe_mode" in str(exc):
            raise ModelError(f"{path}: refused, the model holds Python code (e.g. a Lambda layer) that "
                             "safe loading never runs") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"{path}: not a loadable Keras model ({first})") from None


def load_autoencoder(pretrain_dir: Path) -> keras.Model:
    """The trained autoencoder of a pretrain artifact, without its optimizer state."""
    return load_model(Path(pretrain_dir) / AUTOENCODER_FILE, compile=False)
