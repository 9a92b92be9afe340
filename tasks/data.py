"""The data artifact's arrays and the train/validation/test split every model stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import SplitSpec

DATA_FILE = "data.npz"


@dataclass(frozen=True)
class Dataset:
    """Raw arrays as parsed from the IDX files: uint8 images (n, 28, 28) and uint8 labels (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


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
    np.savez(path, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
    return path


def load_dataset(directory: str | Path) -> Dataset:
    with np.load(Path(directory) / DATA_FILE) as npz:
        return Dataset(npz["x_train"], npz["y_train"], npz["x_test"], npz["y_test"])


def _model_ready(images: np.ndarray) -> np.ndarray:
    return (images.reshape(len(images), -1 if len(images) else 28 * 28) / np.float32(255.0)).astype(np.float32)


def split(ds: Dataset, validation_size: int, train_size: int | None = None, test_size: int | None = None) -> Splits:
    """Hold out the first `validation_size` training images, as TF1's MNIST reader did; then take slices."""
    if validation_size >= len(ds.x_train):
        raise ValueError(f"validation_size {validation_size} leaves no training images out of {len(ds.x_train)}")
    val = slice(0, validation_size)
    train = slice(validation_size, None if train_size is None else validation_size + train_size)
    test = slice(0, test_size)
    return Splits(
        x_train=_model_ready(ds.x_train[train]), y_train=ds.y_train[train].astype(np.int64),
        x_val=_model_ready(ds.x_train[val]), y_val=ds.y_train[val].astype(np.int64),
        x_test=_model_ready(ds.x_test[test]), y_test=ds.y_test[test].astype(np.int64),
    )


def load_splits(directory: str | Path, split_cfg: SplitSpec) -> Splits:
    """Load the data artifact in `directory` and split it by a `DataConfig.split()` mapping."""
    return split(load_dataset(directory), **split_cfg)
