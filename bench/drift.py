"""Calibrate the drift check of new batches: KS distance and p-value of clean and broken batches of real MNIST.

Each candidate batch is 1,000 images; clean ones are shifted by a pixel (as new handwriting would differ), so
none duplicates an accepted image. They are compared, as a new batch is, with all 60,000 training images:
ink per image over the batch, and mean intensity per image class by class (the largest distance and the
smallest p-value of the ten classes). `validate.drift_max_distance` must sit between the clean and the broken.

    python bench/drift.py [--mirror DIR] [--out bench/drift.md]
"""

from __future__ import annotations

import argparse
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tasks.config import DataConfig, ValidateConfig
from tasks.data.checks import reference, summarize_batch
from tasks.data.sources import fetch


def shift(images: np.ndarray, dy: int = 1, dx: int = 1) -> np.ndarray:
    """The digits moved by (dy, dx) pixels (MNIST's digits keep clear of the border, so nothing wraps around)."""
    return np.roll(images, (dy, dx), axis=(1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, default=os.environ.get("MNIST_MIRROR"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("drift.md"))
    args = parser.parse_args()
    ds, _ = fetch(DataConfig(mirror=args.mirror, offline=True))
    ref = reference(ds.x_train, ds.y_train, ds.x_test)
    cfg = ValidateConfig()
    x, y = ds.x_train, ds.y_train
    batches = {f"clean: training images {a:,}-{a + 999:,}, shifted": (shift(x[a:a + 1000]), y[a:a + 1000])
               for a in (0, 10_000, 30_000, 50_000, 55_000, 59_000)}
    # Test images are never a batch (leakage); they stand here for other writers only.
    batches |= {f"other writers: test images {a:,}-{a + 999:,}": (ds.x_test[a:a + 1000], ds.y_test[a:a + 1000])
                for a in (0, 5_000)}
    batches |= {
        "broken: labels shifted by one class": (shift(x[56000:57000], -1, 1), (y[56000:57000] + 1) % 10),
        "broken: images inverted": (255 - shift(x[56000:57000]), y[56000:57000]),
    }
    rows = []
    for name, (images, labels) in batches.items():
        frame = summarize_batch(images, labels, ref, cfg.drift_alpha)
        by_class = frame.groupby("label")[["class_ks_d", "class_ks_p"]].first()
        drifted = bool((frame[["ink_drift", "class_drift"]] >= cfg.drift_max_distance).any().any())
        rows.append(f"| {name} | {frame['ink_ks_d'].iloc[0]:.3f} | {frame['ink_ks_p'].iloc[0]:.1e} | "
                    f"{by_class['class_ks_d'].max():.3f} | {by_class['class_ks_p'].min():.1e} | "
                    f"{'refused' if drifted else 'accepted'} |")
    text = "\n".join([
        f"# Drift check calibration ({datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()}-core {platform.machine()} "
        f"{platform.system()})",
        "",
        f"Rule: drifted when a two-sample KS test is significant (ink: p < {cfg.drift_alpha:g}; per class: "
        f"p < {cfg.drift_alpha / 10:g}) and its distance D >= {cfg.drift_max_distance:g}. "
        "Reference: all 60,000 MNIST training images.",
        "",
        "| batch (1,000 images) | ink D | ink p | largest class D | smallest class p | verdict |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ])
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
