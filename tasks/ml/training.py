"""The one training loop all stages share: compile, seeded input pipeline, per-epoch rows, divergence checks."""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import keras
import numpy as np
from keras import ops

from tasks.config import BaselinesConfig, FinetuneConfig, PretrainConfig, TrainConfig
from tasks.ml.inputs import steps_per_epoch, training_batches
from tasks.ml.optimizers import make_optimizer
from tasks.ml.progress import EpochEnd, Progress
from tasks.ml.training_log import best_row

if TYPE_CHECKING:
    import tensorflow as tf

log = logging.getLogger(__name__)


class TrainingDiverged(ArithmeticError):
    """A loss became NaN or infinite during training; the message names the setting to change."""


# The config section each training config comes from, so a divergence names the setting to change.
SECTIONS: dict[type[TrainConfig], str] = {PretrainConfig: "pretrain", FinetuneConfig: "finetune",
                                          BaselinesConfig: "baselines"}


RECONSTRUCTION_LOSS = "mean_squared_error"


# Training steps per compiled call: fewer round trips from Python per epoch, the same updates (bench/speed.py).
STEPS_PER_EXECUTION = 32


# The modules whose code every training stage's result depends on (part of their artifacts' keys).
TRAINING_CODE = ("tasks.ml.networks", "tasks.ml.optimizers", "tasks.ml.training", "tasks.ml.training_log",
                 "tasks.ml.saved", "tasks.ml.inputs", "tasks.data.splits")


EVALUATION_BATCH = 2048  # images per step of the validation pass after each epoch: fewer, larger matmuls


CLASSIFICATION_LOSS = "sparse_categorical_crossentropy"


@keras.saving.register_keras_serializable(package="mnist_ae")
class LastBatchLoss(keras.metrics.Metric):
    """The loss of the most recent batch, as the notebook printed it (Keras logs the epoch's running mean)."""

    def __init__(self, loss: str = RECONSTRUCTION_LOSS, name: str = "last_batch_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.loss = loss
        self._loss_fn = keras.losses.get(loss)
        self.value = self.add_variable(shape=(), initializer="zeros", name="value")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.value.assign(ops.cast(ops.mean(self._loss_fn(y_true, y_pred)), self.dtype))

    def result(self):
        return ops.convert_to_tensor(self.value)

    def get_config(self):
        return {"loss": self.loss, "name": self.name, "dtype": self.dtype}


def compile_model(model: keras.Model, cfg: TrainConfig, loss: str, steps: int = 1, encoder_rate: float = 1.0) -> None:
    """Compile with the configured optimizer and schedule, the last-batch loss metric and, for classifiers, accuracy.

    `steps` is the number of optimizer steps the training plans (`cfg.epochs` passes), which a schedule spans.
    """
    metrics: list[keras.metrics.Metric] = [LastBatchLoss(loss)]
    if loss == CLASSIFICATION_LOSS:
        metrics.append(keras.metrics.SparseCategoricalAccuracy(name="accuracy"))
    rate: float | keras.optimizers.schedules.LearningRateSchedule = cfg.learning_rate
    if cfg.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=max(1, steps))
    # No XLA: its compilation per model costs more than a short training gains on a CPU (bench/speed.py), and
    # Keras turns it off under op determinism anyway.
    model.compile(optimizer=make_optimizer(cfg.optimizer, rate, encoder_rate), loss=loss, metrics=metrics,
                  jit_compile=False, steps_per_execution=STEPS_PER_EXECUTION)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow's ops deterministic, before a stage trains.

    Seeding per stage (not once per run) is what makes a stage re-run alone reproduce itself; the trainings
    themselves draw only from explicit seeds (initializers, `tasks.ml.inputs`). Op determinism is process-wide
    and irreversible; TensorFlow raises an error rather than run an op without a deterministic kernel.
    """
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


class _EpochLog(keras.callbacks.Callback):
    """Collects one training log row per epoch and reports it to the progress callable."""

    def __init__(self, epochs: int, progress: Progress | None, name: str, cfg: TrainConfig | None = None,
                 part: tuple[int, int] = (0, 1)):
        super().__init__()
        self.rows: list[dict[str, float | int | None]] = []
        self._epochs, self._progress, self._name, self._cfg = epochs, progress, name, cfg
        self._part = part
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row: dict[str, float | int | None] = {
            "epoch": epoch + 1,
            "loss_last_batch": float(logs["last_batch_loss"]),
            "loss_mean": float(logs["loss"]),
            "val_loss": _maybe_float(logs.get("val_loss")),
        }
        if "accuracy" in logs:
            row["accuracy"] = float(logs["accuracy"])
            row["val_accuracy"] = _maybe_float(logs.get("val_accuracy"))
        row["seconds"] = round(time.perf_counter() - self._started, 3)
        self.rows.append(row)
        log.info("%s epoch %d/%d: %s", self._name, epoch + 1, self._epochs,
                 ", ".join(f"{k} {v:.6g}" for k, v in row.items() if isinstance(v, float) and k != "seconds"))
        if self._progress is not None:
            index, parts = self._part
            self._progress(EpochEnd(self._name, epoch + 1, self._epochs,
                                    {k: v for k, v in row.items() if isinstance(v, float) and k != "seconds"},
                                    (index + (epoch + 1) / self._epochs) / parts))
        # Weights that produced a NaN or infinite loss are useless; stop before they are saved or evaluated.
        bad = [k for k in ("loss_mean", "loss_last_batch", "val_loss")
               if isinstance(row[k], float) and not math.isfinite(row[k])]
        if bad:
            raise TrainingDiverged(diverged_message(self._name, epoch + 1, f"the loss became {row[bad[0]]}",
                                                    self._cfg))
        # The loss alone can miss NaN weights: vectorised activations that clamp their input with min/max
        # instructions (oneDNN's sigmoid, on CPUs where TensorFlow uses it) turn NaN into a number.
        if not all(np.isfinite(w).all() for w in self.model.get_weights()):
            raise TrainingDiverged(diverged_message(self._name, epoch + 1, "its weights became NaN or infinite",
                                                    self._cfg))


def diverged_message(model: str, epoch: int, what: str, cfg: TrainConfig | None) -> str:
    """One line saying which training diverged, `what` went wrong, and which setting to lower."""
    section = SECTIONS.get(type(cfg), "") if cfg is not None else ""
    lr = f"{section}.learning_rate" if section else "the learning rate"
    now = f" (now {cfg.learning_rate:g})" if cfg is not None else ""
    where = f"{section}: " if section else ""
    return (f"{where}training of {model} diverged: {what} in epoch {epoch}; nothing was cached. "
            f"Lower {lr}{now} and run again")


def _maybe_float(value: Any) -> float | None:
    return None if value is None else float(value)


def fit(model: keras.Model, x: np.ndarray, y: np.ndarray | None, validation: tuple[np.ndarray, np.ndarray] | None,
        cfg: TrainConfig, progress: Progress | None = None, *, seed: int = 0, tensorboard: Path | None = None,
        name: str | None = None, part: tuple[int, int] = (0, 1), batches: tf.data.Dataset | None = None,
        encoder_rate: float = 1.0,
        ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Compile and train a model; return its training log (per-epoch rows) and a summary of the run.

    `y=None` trains an autoencoder to reconstruct `x`. The batches come from `tasks.ml.inputs` (a new order every
    epoch, the config's noise and shifts), all drawn from `seed`. `name` (default: the model's) names the model in
    log lines, progress and TensorBoard runs. With `tensorboard`, Keras writes the epoch scalars as TensorBoard
    event files into `<tensorboard>/<name>/`. `part` is (this model's index, models the stage trains), so progress
    reports the stage's share done. `batches` replaces the input pipeline's batches of (`x`, `y`), with as many
    steps per epoch (`tasks.ml.semi_supervised` adds unlabeled images to them). `encoder_rate` scales the learning
    rate of the encoder's layers.
    """
    name = name or model.name
    steps = steps_per_epoch(len(x), cfg.batch_size)
    compile_model(model, cfg, RECONSTRUCTION_LOSS if y is None else CLASSIFICATION_LOSS, steps * cfg.epochs,
                  encoder_rate)
    if batches is None:
        batches = training_batches(x, y, cfg.batch_size, seed, noise=getattr(cfg, "noise", 0.0), shift=cfg.shift)
    epoch_log = _EpochLog(cfg.epochs, progress, name, cfg, part)
    callbacks: list[keras.callbacks.Callback] = [epoch_log]
    if cfg.early_stopping_patience is not None:
        if validation is None:
            raise ValueError("early stopping needs a validation split (validation_size > 0)")
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=cfg.early_stopping_patience, restore_best_weights=True))
    if tensorboard is not None:
        # Scalars only: no graph, histograms or profiler, which would cost time and draw nothing readers need.
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(tensorboard / name), histogram_freq=0,
                                                     write_graph=False, profile_batch=0, update_freq="epoch"))
    started = time.perf_counter()
    try:
        model.fit(batches, epochs=cfg.epochs, steps_per_epoch=steps, validation_data=validation,
                  validation_batch_size=EVALUATION_BATCH, shuffle=False, callbacks=callbacks, verbose=0)
    except TrainingDiverged:
        if tensorboard is not None:  # curves of a diverged training are no partial output worth keeping
            shutil.rmtree(tensorboard / name, ignore_errors=True)
            if tensorboard.is_dir() and not any(tensorboard.iterdir()):
                tensorboard.rmdir()
        raise
    seconds = time.perf_counter() - started
    return epoch_log.rows, summarize(epoch_log.rows, seconds, restored=cfg.early_stopping_patience is not None)


def summarize(rows: list[dict[str, Any]], seconds: float, restored: bool) -> dict[str, Any]:
    """The epoch count and the values of the epoch whose weights were kept: the last, or the best when restored."""
    if not rows:
        raise ValueError("training ran no epoch")
    kept = best_row(rows) if restored else rows[-1]
    summary: dict[str, Any] = {"epochs_run": len(rows), "seconds": round(seconds, 2)}
    summary.update({k: v for k, v in kept.items() if k not in ("epoch", "seconds")})
    if restored:
        summary["best_epoch"] = kept["epoch"]
        summary["best_val_loss"] = kept["val_loss"]
    return summary
