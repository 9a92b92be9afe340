"""Shared fixtures: the real MNIST mirror, a fresh store, no network and no user state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
    """Never touch the network, the user's Keras cache or the user's store."""
    monkeypatch.setenv("MNIST_AE_OFFLINE", "1")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path_factory.mktemp("keras-home")))
    monkeypatch.delenv("MNIST_AE_STORE", raising=False)


@pytest.fixture
def store_root(tmp_path) -> Path:
    return tmp_path / "store"
