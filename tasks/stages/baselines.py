"""Stage 5: the notebook's comparison models, softmax regression and the same network without pretraining."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tasks.config import BaselinesConfig, SplitSpec
from tasks.data.splits import load_splits
from tasks.ml.networks import build_ann, build_softmax_regression
from tasks.ml.progress import Progress
from tasks.ml.training import TRAINING_CODE, fit, seed_everything
from tasks.ml.training_log import write_training_log
from tasks.pipeline.contract import Contract
from tasks.stages.files import MODEL_FILES, TENSORBOARD_DIR, TRAINING_LOG_FILES

log = logging.getLogger(__name__)



def run(cfg: BaselinesConfig, split: SplitSpec, data_dir: Path, out: Path,
        progress: Progress | None = None, *, hidden: tuple[int, ...], activation: str, seed: int = 0) -> dict[str, Any]:
    """Train softmax regression and a randomly initialised 784-hidden-10 network with the same settings.

    `hidden` and `activation` must be the pretrained model's, so that the ANN differs from it only by the
    missing pretraining. Writes `softmax.keras`, `ann.keras`, their training logs `<model>_training_log.json` and
    TensorBoard event files under `tensorboard/`.
    `progress` sees each model's epochs by name, softmax first, then the ANN.
    """
    seed_everything(seed)
    data = load_splits(data_dir, split)
    validation = (data.x_val, data.y_val) if len(data.x_val) else None
    models = {
        "softmax": (build_softmax_regression(), MODEL_FILES["softmax"][1], TRAINING_LOG_FILES["softmax"][1]),
        "ann": (build_ann(hidden, activation, cfg.init, seed), MODEL_FILES["ann"][1], TRAINING_LOG_FILES["ann"][1]),
    }
    summary: dict[str, Any] = {"train_size": len(data.x_train), "val_size": len(data.x_val),
                               "hidden": list(hidden), "activation": activation, "init": cfg.init}
    for index, (name, (model, model_file, training_log_file)) in enumerate(models.items()):
        rows, summary[name] = fit(model, data.x_train, data.y_train, validation, cfg, progress, seed=seed,
                                  tensorboard=out / TENSORBOARD_DIR, name=name, part=(index, len(models)))
        model.save(out / model_file)
        write_training_log(rows, out / training_log_file)
    summary["seconds"] = round(sum(summary[name]["seconds"] for name in models), 2)
    log.info("baselines done: %s", summary)
    return summary


# The ANN copies the pretrained network's shape (`hidden`, `activation`), so it differs only by the pretraining.
# It needs only validated data, so it runs beside pretraining and fine-tuning.
CONTRACT = Contract(stage="baselines", run=run, section="baselines", shared=("split", "seed", "hidden", "activation"),
                    reads={"data_dir": "download"}, after=("validate",),
                    writes=tuple(files[model][1] for files in (MODEL_FILES, TRAINING_LOG_FILES)
                                 for model in ("softmax", "ann")),
                    code=(__name__, *TRAINING_CODE), progress=True)

