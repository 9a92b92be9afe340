"""Stage 4: put a softmax head on the pretrained encoder and train the classifier (the notebook's fine-tuning)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.config import FinetuneConfig, SplitSpec
from tasks.data.splits import Splits, load_splits
from tasks.ml.networks import build_classifier, extract_encoder
from tasks.ml.progress import Progress
from tasks.ml.saved import load_autoencoder
from tasks.ml.semi_supervised import fit_semi_supervised
from tasks.ml.training import TRAINING_CODE, fit, seed_everything
from tasks.ml.training_log import write_training_log
from tasks.pipeline.contract import Contract
from tasks.stages.files import MODEL_FILES, TENSORBOARD_DIR, TRAINING_LOG_FILES

log = logging.getLogger(__name__)



def run(cfg: FinetuneConfig, split: SplitSpec, data_dir: Path, pretrain_dir: Path, out: Path,
        progress: Progress | None = None, *, seed: int = 0) -> dict[str, Any]:
    """Fine-tune the pretrained encoder with a zero-initialised softmax head on the training labels.

    The notebook minimises the cross-entropy over all variables, so the encoder trains too unless
    `cfg.freeze_encoder`. With `cfg.unlabeled == "vat"` the classifier also learns from the training images
    without their labels (`tasks.ml.semi_supervised`); the probe stays supervised. Writes `pretrained.keras` and
    `pretrained_training_log.json`; with `cfg.linear_probe` also a frozen-encoder probe, `probe.keras` and
    `probe_training_log.json`; TensorBoard event files under `tensorboard/`.
    """
    seed_everything(seed)
    data = load_splits(data_dir, split)
    autoencoder = load_autoencoder(pretrain_dir)
    models = 2 if cfg.linear_probe else 1
    summary = _train(cfg, data, autoencoder, cfg.freeze_encoder, out, "pretrained", progress, (0, models), seed,
                     cfg.unlabeled == "vat")
    summary.update(train_size=len(data.x_train), val_size=len(data.x_val), freeze_encoder=cfg.freeze_encoder,
                   unlabeled=cfg.unlabeled)
    if cfg.linear_probe:
        summary["probe"] = _train(cfg, data, autoencoder, True, out, "probe", progress, (1, models), seed)
    log.info("fine-tuning done: %s", summary)
    return summary


CONTRACT = Contract(stage="finetune", run=run, section="finetune", shared=("split", "seed"),
                    reads={"data_dir": "download", "pretrain_dir": "pretrain"},
                    writes=(MODEL_FILES["pretrained"][1], TRAINING_LOG_FILES["pretrained"][1]),
                    code=(__name__, *TRAINING_CODE, "tasks.ml.semi_supervised"), progress=True)




def _train(cfg: FinetuneConfig, data: Splits, autoencoder: Any, freeze: bool, out: Path, name: str,
           progress: Progress | None, part: tuple[int, int], seed: int, semi: bool = False) -> dict[str, Any]:
    """Build one classifier on a fresh copy of the encoder, train it and write its model and training log."""
    model = build_classifier(extract_encoder(autoencoder), freeze=freeze)
    validation = (data.x_val, data.y_val) if len(data.x_val) else None
    if semi:
        rows, summary = fit_semi_supervised(model, data.x_train, data.y_train, data.x_train, validation, cfg, cfg.vat,
                                            progress, seed=seed, tensorboard=out / TENSORBOARD_DIR, name=name,
                                            part=part)
    else:
        rows, summary = fit(model, data.x_train, data.y_train, validation, cfg, progress, seed=seed,
                            tensorboard=out / TENSORBOARD_DIR, name=name, part=part)
    model_file, training_log_file = MODEL_FILES[name][1], TRAINING_LOG_FILES[name][1]
    model.save(out / model_file)
    write_training_log(rows, out / training_log_file)
    return summary
