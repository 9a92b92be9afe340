"""The data artifact's arrays and the train/validation/test split every model stage uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tasks.config import SplitSpec
from tasks.stages.files import DATA_FILE


def _no_images() -> np.ndarray:
    return np.empty((0, 28, 28), np.uint8)


def _no_labels() -> np.ndarray:
    return np.empty((0,), np.uint8)


@dataclass(frozen=True)
class Dataset:
    """Raw arrays as parsed from the IDX files: uint8 images (n, 28, 28) and uint8 labels (n,).

    `x_batches`/`y_batches` are the accepted incoming batches, which join the training images.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    x_batches: np.ndarray = field(default_factory=_no_images)
    y_batches: np.ndarray = field(default_factory=_no_labels)


@dataclass(frozen=True)
class Splits:
    """Model-ready arrays: float32 images flattened to 784 and scaled to [0, 1], int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def save_dataset(ds: Dataset, directory: Path) -> Path:
    path = directory / DATA_FILE
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test,
             x_batches=ds.x_batches, y_batches=ds.y_batches)
    return path


def load_dataset(directory: str | Path) -> Dataset:
    with np.load(Path(directory) / DATA_FILE) as npz:
        batches = (npz["x_batches"], npz["y_batches"]) if "x_batches" in npz.files else (_no_images(), _no_labels())
        return Dataset(npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"], *batches)


def _model_ready(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1 if len(images) else 28 * 28) / np.float32(255.0)).astype(np.float32)


def _train_slice(validation_size: int, train_size: int | None) -> slice:
    return slice(validation_size, None if train_size is None else validation_size + train_size)


def training_images(base: int, batches: int, validation_size: int, train_size: int | None = None,
                    test_size: int | None = None) -> int:
    """How many images the model stages train on: the configured slice of `base` images plus every batch image."""
    return len(range(base)[_train_slice(validation_size, train_size)]) + batches


def split(ds: Dataset, validation_size: int, train_size: int | None = None, test_size: int | None = None) -> Splits:
    """Hold out the first `validation_size` training images, as TF1's MNIST reader did; then take slices.

    The accepted incoming batches join the training slice whole: they never enter the held-out or test images.
    """
    if validation_size >= len(ds.x_train):
        raise ValueError(f"validation_size {validation_size} leaves no training images out of {len(ds.x_train)}")
    val = slice(0, validation_size)
    train = _train_slice(validation_size, train_size)
    test = slice(0, test_size)
    x_train, y_train = ds.x_train[train], ds.y_train[train]
    if len(ds.y_batches):
        x_train, y_train = np.concatenate([x_train, ds.x_batches]), np.concatenate([y_train, ds.y_batches])
    return Splits(
        x_train=_model_ready(x_train), y_train=y_train.astype(np.int64),
        x_val=_model_ready(ds.x_train[val]), y_val=ds.y_train[val].astype(np.int64),
        x_test=_model_ready(ds.x_test[test]), y_test=ds.y_test[test].astype(np.int64),
    )


def load_splits(directory: str | Path, split_cfg: SplitSpec) -> Splits:
    """Load the data artifact in `directory` and split it by a `DataConfig.split()` mapping."""
    return split(load_dataset(directory), **split_cfg)
