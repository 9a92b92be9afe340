"""Stage 2: check the raw dataset with a Great Expectations suite over a per-image summary frame."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.config import ValidateConfig
from tasks.data.checks import EXPECTED_ROWS, summarize, validate_frame
from tasks.data.splits import load_dataset
from tasks.pipeline.contract import Contract
from tasks.stages.files import DOCS_INDEX, VALIDATION_FILE

log = logging.getLogger(__name__)


def run(cfg: ValidateConfig, data_dir: Path, dataset: str, out: Path) -> dict[str, Any]:
    """Stage entry point: load the data artifact in `data_dir`, summarize it per image and validate it into `out`."""
    started = time.perf_counter()
    ds = load_dataset(data_dir)
    frame = summarize(ds)
    summarized = time.perf_counter()
    # The accepted batches join the training images; each was validated on its own before it was accepted.
    expected = {**EXPECTED_ROWS[dataset], "train": EXPECTED_ROWS[dataset]["train"] + len(ds.y_batches)}
    summary = validate_frame(frame, cfg, dataset, out, expected)
    log.info("validated %s: %d images in %.1f s (summary %.1f s)", dataset, len(frame),
             time.perf_counter() - started, summarized - started)
    return summary


# The drift settings judge new batches only (tasks/data/intake.py), not the data artifact, so they are not in its key.
CONTRACT = Contract(stage="validate", run=run, section="validate_", shared=("dataset",), reads={"data_dir": "download"},
                    keyed=("min_class_share", "max_class_share"), writes=(VALIDATION_FILE, DOCS_INDEX),
                    code=(__name__, "tasks.data.checks", "tasks.data.splits", "tasks.data.data_docs"))
