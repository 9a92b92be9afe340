"""A training log: one row of numbers per epoch, as training writes it and reports read it (no Keras needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The epoch of the lowest validation loss, whose weights EarlyStopping restores at the end of training."""
    return min(rows, key=lambda r: r["val_loss"] if r.get("val_loss") is not None and math.isfinite(r["val_loss"])
               else math.inf)


def write_training_log(rows: list[dict[str, Any]], path: Path) -> Path:
    """Write a training log (per-epoch rows) as a JSON list."""
    # Written inside the store's staging directory, which is published atomically and fsynced as a whole.
    path.write_text(json.dumps(rows, indent=2, sort_keys=True, default=str))
    return path
