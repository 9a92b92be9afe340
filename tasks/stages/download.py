"""Stage 1: get MNIST or Fashion-MNIST from a local mirror, Keras's cache or the public mirrors, verified."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from tasks.config import DataConfig
from tasks.data import batches
from tasks.data.sources import fetch
from tasks.data.splits import save_dataset
from tasks.pipeline.contract import Contract
from tasks.stages.files import DATA_FILE

log = logging.getLogger(__name__)


def run(cfg: DataConfig, out: Path) -> dict[str, Any]:
    """Fetch the dataset, add the accepted incoming batches, write `data.npz` into `out`; say what it holds."""
    ds, description = fetch(cfg)
    x_batches, y_batches = batches.load_accepted(cfg.incoming, cfg.batches)
    save_dataset(replace(ds, x_batches=x_batches, y_batches=y_batches), out)
    if cfg.batches:
        log.info("added %d images of %d accepted batch(es)", len(y_batches), len(cfg.batches))
    return {**description, "counts": {**description["counts"], "batches": len(y_batches)},
            "batches": list(cfg.batches)}


# The key covers the dataset and the accepted batches: where the files were found never changes them, since the
# base payloads are verified against pinned hashes and each batch against its content hash.
CONTRACT = Contract(stage="download", run=run, section="data", keyed=("dataset", "batches"), reads={},
                    writes=(DATA_FILE,), code=(__name__, "tasks.data.sources", "tasks.data.idx", "tasks.data.splits"))
