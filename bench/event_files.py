"""What the TensorBoard event files cost: the same seeded fits with and without them, in one invocation.

Trains the `default` profile's autoencoder on real MNIST (the first 20,000 training images) for a few epochs,
alternating runs without and with `tensorboard=`, and prints the median seconds of each and their ratio. It also
checks that both give the same weights. Run: `.venv/bin/python bench/event_files.py [--epochs N] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from tasks.config import load_config
from tasks.data.sources import read_mirror
from tasks.ml.networks import build_autoencoder
from tasks.ml.training import fit, seed_everything


def _images(count: int) -> np.ndarray:
    mirror = Path(os.environ.get("MNIST_MIRROR", "../shared/data/mnist"))
    x = read_mirror(mirror, "mnist")[0].x_train[:count]
    return x.reshape(len(x), -1).astype("float32") / 255.0


def _fit(x: np.ndarray, epochs: int, logdir: Path | None) -> tuple[float, list[np.ndarray]]:
    cfg = load_config("default").pretrain.model_copy(update={"epochs": epochs, "early_stopping_patience": None})
    seed_everything(0)
    model = build_autoencoder(cfg, 0)
    started = time.perf_counter()
    fit(model, x, None, None, cfg, tensorboard=logdir)
    return time.perf_counter() - started, model.get_weights()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    x = _images(20_000)
    plain, logged = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            seconds, without = _fit(x, args.epochs, None)
            plain.append(seconds)
            seconds, with_files = _fit(x, args.epochs, Path(tmp) / str(i))
            logged.append(seconds)
            assert all(np.array_equal(a, b) for a, b in zip(without, with_files, strict=True))
    a, b = statistics.median(plain), statistics.median(logged)
    print(f"keras {keras.__version__}, {args.epochs} epochs x 20,000 images, {args.repeats} repeats, median seconds:")
    print(f"  without event files {a:.2f} s, with {b:.2f} s: ratio {b / a:.3f}; same weights in every repeat")


if __name__ == "__main__":
    main()
