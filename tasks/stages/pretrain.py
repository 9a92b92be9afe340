"""Stage 3: train the autoencoder to reconstruct the training images (the notebook's pretraining)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from tasks.config import PretrainConfig, SplitSpec
from tasks.data.splits import load_splits
from tasks.ml.networks import build_autoencoder
from tasks.ml.progress import Progress
from tasks.ml.training import TRAINING_CODE, fit, seed_everything
from tasks.ml.training_log import write_training_log
from tasks.pipeline.contract import Contract
from tasks.stages.files import AUTOENCODER_FILE, RECONSTRUCTION_FILE, TENSORBOARD_DIR, TRAINING_LOG_FILE

log = logging.getLogger(__name__)

EXAMPLES_TO_SHOW = 10


def run(cfg: PretrainConfig, split: SplitSpec, data_dir: Path, out: Path,
        progress: Progress | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Train the autoencoder on the training split and write its model, training log and reconstruction figure.

    `split` is `DataConfig.split()`; the validation split drives early stopping when it is configured.
    Writes `autoencoder.keras`, `training_log.json` (one row per epoch; `loss_last_batch` is what the notebook
    printed), `reconstruction.png` (ten test digits above their reconstructions) and the TensorBoard event
    files (`tensorboard/autoencoder/`) into `out`.
    """
    seed_everything(seed)
    data = load_splits(data_dir, split)
    validation = (data.x_val, data.x_val) if len(data.x_val) else None
    model = build_autoencoder(cfg, seed)
    rows, summary = fit(model, data.x_train, None, validation, cfg, progress, seed=seed,
                        tensorboard=out / TENSORBOARD_DIR)

    model.save(out / AUTOENCODER_FILE)
    write_training_log(rows, out / TRAINING_LOG_FILE)
    reconstructed = model.predict(data.x_test, batch_size=1024, verbose=0)
    shown = slice(0, EXAMPLES_TO_SHOW)
    save_reconstructions(data.x_test[shown], reconstructed[shown], out / RECONSTRUCTION_FILE)

    summary.update(
        train_size=len(data.x_train),
        val_size=len(data.x_val),
        test_size=len(data.x_test),
        reconstruction_mse_shown=_mse(data.x_test[shown], reconstructed[shown]),
        reconstruction_mse_test=_mse(data.x_test, reconstructed),
        parameters=model.count_params(),
    )
    log.info("pretraining done: %s", summary)
    return summary


# Pretraining sees the training images only after they passed validation; it never reads their labels.
CONTRACT = Contract(stage="pretrain", run=run, section="pretrain", shared=("split", "seed"),
                    reads={"data_dir": "download"}, after=("validate",),
                    writes=(AUTOENCODER_FILE, TRAINING_LOG_FILE, RECONSTRUCTION_FILE), code=(__name__, *TRAINING_CODE),
                    progress=True)


def _mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(np.square(x.astype(np.float64) - y.astype(np.float64))))


def save_reconstructions(images: np.ndarray, reconstructed: np.ndarray, path: Path) -> Path:
    """Draw originals (top row) above reconstructions (bottom row), as the notebook's 2x10 figure did."""
    count = len(images)
    fig = Figure(figsize=(count, 2))
    FigureCanvasAgg(fig)  # headless: the Agg canvas renders straight to PNG, no pyplot state
    axes = fig.subplots(2, count, squeeze=False, gridspec_kw=dict(left=0, right=1, bottom=0, top=1,
                                                                  wspace=0.05, hspace=0.05))
    for i in range(count):
        for row, pixels in enumerate((images[i], reconstructed[i])):
            axes[row][i].imshow(np.reshape(pixels, (28, 28)), cmap="gray", vmin=0.0, vmax=1.0)
            axes[row][i].set_axis_off()
    fig.savefig(path, dpi=100)
    return path
