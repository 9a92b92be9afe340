"""Shared fixtures: the real MNIST mirror, a fresh store, no network and no user state."""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tasks.data import Dataset

ROOT = Path(__file__).resolve().parents[1]


def _mirror() -> Path:
    return Path(os.environ.get("MNIST_MIRROR") or ROOT.parent / "shared" / "data" / "mnist").resolve()


@pytest.fixture(scope="session")
def mnist_mirror() -> Path:
    """The local copy of the four canonical MNIST IDX files."""
    path = _mirror()
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"MNIST mirror not found at {path}; set MNIST_MIRROR")
    return path


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """Never touch the network, the user's Keras cache, the user's store or incoming batches."""
    monkeypatch.setenv("MNIST_AE_OFFLINE", "1")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
    monkeypatch.delenv("MNIST_AE_STORE", raising=False)
    monkeypatch.delenv("MNIST_AE_INCOMING", raising=False)


@pytest.fixture
def store_root(tmp_path) -> Path:
    return tmp_path / "store"


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzipped IDX file independently of the project's parser: dims from the header, then uint8 data."""
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="session")
def mnist(mnist_mirror) -> Dataset:
    """All of real MNIST (read-only arrays), parsed independently of the download stage."""
    return Dataset(*(read_idx(mnist_mirror / f"{name}.gz") for name in (
        "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")))


@pytest.fixture(scope="session")
def mnist_head(mnist) -> Callable[[int, int], Dataset]:
    """The first `train` training and `test` test images of real MNIST, as a writable Dataset."""
    def head(train: int, test: int) -> Dataset:
        return Dataset(mnist.x_train[:train].copy(), mnist.y_train[:train].copy(),
                       mnist.x_test[:test].copy(), mnist.y_test[:test].copy())

    return head
