"""The label-efficiency study's cells: a class-balanced labeled subset, one model trained on it, test predictions.

A cell is one (budget, seed, model). Its subset is the first `budget` images of a per-seed order of the
training split that takes one image of each class in turn, so subsets are class-balanced and nested: the
300-label subset of a seed holds its 100-label subset. The model's recipe is chosen from its grid by
cross-validation on the subset alone (`tasks.study.selection`), then trained on the whole subset; its step count
follows from the budget (`schedule`). The validation images and the test labels are never read for any choice,
and the test labels only score the finished model.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from tasks.config import (
    HeadInit,
    Init,
    Optimizer,
    SemiStudyConfig,
    SplitSpec,
    StudyConfig,
    StudyModel,
    TrainConfig,
    Tuning,
)
from tasks.data.mnist import CLASSES
from tasks.data.splits import load_splits
from tasks.ml.inference import probabilities
from tasks.ml.networks import build_ann, build_classifier, build_softmax_regression, extract_encoder
from tasks.ml.saved import load_autoencoder
from tasks.ml.semi_supervised import fit_semi_supervised
from tasks.ml.training import TRAINING_CODE, fit, seed_everything
from tasks.ml.training_log import write_training_log
from tasks.pipeline.contract import Contract
from tasks.stages.files import CELL_MODEL_FILE, CELL_PREDICTIONS_FILE, CELL_RESULT_FILE, TRAINING_LOG_FILE
from tasks.study import selection

log = logging.getLogger(__name__)

STAGE = "study-cell"
# A small budget is tiled so that one Keras pass over it is about this many steps, not one step per pass
# (Keras pays a fixed cost and logs a line per pass); the number of optimizer steps stays what `steps` says.
STEPS_PER_PASS = 50
# The encoder's share of the learning rate when a recipe fine-tunes it slowly.
SLOW_ENCODER_RATE = 0.1
# The models that also learn from the training split's images without their labels (tasks.ml.semi_supervised).
SEMI_MODELS = ("semi-pretrained", "semi-scratch")


class Cell(BaseModel):
    """One cell of the grid: what it trains, on how many labels, with which seed, schedule and recipes to try.

    `learning_rate`, `head`, `step_scale` and `tuning` are what a recipe may override (`candidates`); the
    selection splits the budget into `folds` folds, or holds out a `holdout` share of it when that is set.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: StudyModel
    budget: int
    seed: int
    optimizer: Optimizer
    learning_rate: float
    batch_size: int
    epochs: int
    min_steps: int
    init: Init  # of the ANN's random initialisation, the pipeline's baselines.init
    head: HeadInit = "zeros"
    step_scale: float = 1.0
    tuning: Tuning = "joint"
    candidates: tuple[dict[str, Any], ...] = ()
    folds: int = 3
    holdout: float | None = None
    semi: SemiStudyConfig | None = None  # how a semi-supervised model trains; None for the others

    @property
    def name(self) -> str:
        return f"{self.model}-{self.budget}-seed{self.seed}"

    @property
    def pretrained(self) -> bool:
        """Whether the cell's model starts from the pretrained encoder (so reads the pretraining)."""
        return self.model in ("pretrained", "semi-pretrained")


def seeds_of(cfg: StudyConfig, budget: int) -> int:
    """How many seeds a budget trains: fewer from `large_from` on."""
    return min(cfg.seeds, cfg.large_seeds) if budget >= cfg.large_from else cfg.seeds


def grid(cfg: StudyConfig, init: Init) -> list[Cell]:
    """Every (budget, seed, model) cell of the study, budgets outermost; the semi-supervised models only at theirs."""
    schedule = cfg.model_dump(include={"optimizer", "learning_rate", "batch_size", "epochs", "min_steps", "folds"})
    # A semi-supervised model starts from its own learning rate, which its recipes may override like any other.
    semi = {"semi": cfg.semi, "learning_rate": cfg.semi.learning_rate}
    return [Cell(model=model, budget=budget, seed=seed, init=init,
                 **{**schedule, **(semi if model in SEMI_MODELS else {})},
                 candidates=tuple(selection.recipes(cfg.search.get(model))),
                 holdout=cfg.holdout if budget >= cfg.large_from else None)
            for budget in cfg.budgets for seed in range(seeds_of(cfg, budget)) for model in cfg.models
            if model not in SEMI_MODELS or budget in cfg.semi.budgets]


# --- the labeled subset ---------------------------------------------------------------------------------------

def labeled_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Indices of all training images in the order a seed labels them: one of each class in turn.

    Each class's images are shuffled by the seed; the classes take turns in a seeded order, and a class that
    runs out drops out of the rotation. Any prefix is therefore as class-balanced as the data allows.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, 0x5EED])  # independent of the seed's use for Keras
    classes = rng.permutation(np.unique(labels))
    queues = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    depth = max((len(q) for q in queues), default=0)
    # Row r holds the r-th pick of each class; -1 marks a class already exhausted.
    table = np.full((depth, len(queues)), -1, dtype=np.int64)
    for column, queue in enumerate(queues):
        table[: len(queue), column] = queue
    flat = table.ravel()
    return flat[flat >= 0]


def labeled_subset(labels: np.ndarray, budget: int, seed: int) -> np.ndarray:
    """The indices of a seed's `budget` labeled training images (nested across budgets), in sorted order."""
    if not 0 < budget <= len(labels):
        raise ValueError(f"budget {budget} must lie in 1..{len(labels)}, the labeled training images available")
    return np.sort(labeled_order(labels, seed)[:budget])


# --- the schedule ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """How a cell trains, fixed by its budget alone: batch size, tiling of the subset, passes, optimizer steps."""

    batch_size: int
    repeats: int
    passes: int
    steps: int


def schedule(cell: Cell) -> Schedule:
    """At least `step_scale * max(min_steps, epochs * ceil(budget / batch))` optimizer steps, in whole passes."""
    batch = min(cell.batch_size, cell.budget)
    fewest = cell.semi.min_steps if cell.semi else cell.min_steps
    wanted = math.ceil(cell.step_scale * max(fewest, cell.epochs * math.ceil(cell.budget / batch)))
    repeats = max(1, (STEPS_PER_PASS * batch) // cell.budget)
    per_pass = math.ceil(cell.budget * repeats / batch)
    passes = math.ceil(wanted / per_pass)
    return Schedule(batch_size=batch, repeats=repeats, passes=passes, steps=passes * per_pass)


# --- one cell ----------------------------------------------------------------------------------------------------

def train(cell: Cell, x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], activation: str,
          autoencoder: Any = None, unlabeled: np.ndarray | None = None) -> tuple[Any, list[dict[str, Any]], Schedule]:
    """Train the cell's model with the cell's own settings; returns the model, its training log rows and the schedule.

    Everything it learns from is in `x` and `y` (the budget's images and labels, or a part of them in the
    selection) and, for a semi-supervised model, `unlabeled` (the training split's images, whose labels it never
    sees).
    """
    if len(x) != cell.budget or len(y) != cell.budget:
        raise ValueError(f"{cell.name}: expected {cell.budget} labeled images, got {len(x)} and {len(y)}")
    seed_everything(cell.seed)
    if cell.pretrained:
        if autoencoder is None:
            raise ValueError(f"{cell.name}: the pretrained model needs the pretrained autoencoder")
        model = build_classifier(extract_encoder(autoencoder), freeze=False, head=cell.head, seed=cell.seed)
    elif cell.model in ("ann", "semi-scratch"):
        model = build_ann(hidden, activation, cell.init, cell.seed, head=cell.head)
    else:
        model = build_softmax_regression(head=cell.head, seed=cell.seed)
    plan = schedule(cell)
    x_tiled, y_tiled = np.tile(x, (plan.repeats, 1)), np.tile(y, plan.repeats)

    def passes(count: int, seed: int, encoder_rate: float = 1.0) -> list[dict[str, Any]]:
        cfg = TrainConfig(optimizer=cell.optimizer, learning_rate=cell.learning_rate, epochs=count,
                          batch_size=plan.batch_size)
        return fit(model, x_tiled, y_tiled, None, cfg, seed=seed, encoder_rate=encoder_rate)[0]

    if cell.semi is not None:
        if unlabeled is None:
            raise ValueError(f"{cell.name}: the semi-supervised model needs the unlabeled training images")
        # Cosine decay: VAT's best rate here is too large to end a training with (bench/semi_supervised.py).
        cfg = TrainConfig(optimizer=cell.optimizer, learning_rate=cell.learning_rate, epochs=plan.passes,
                          batch_size=plan.batch_size, schedule="cosine", shift=cell.semi.shift)
        rows, _ = fit_semi_supervised(model, x_tiled, y_tiled, unlabeled, None, cfg, cell.semi.vat, seed=cell.seed)
    elif cell.model != "pretrained" or cell.tuning == "joint":
        rows = passes(plan.passes, cell.seed)
    elif cell.tuning == "slow_encoder":
        rows = passes(plan.passes, cell.seed, SLOW_ENCODER_RATE)
    else:  # head_first: the encoder frozen for the first half of the passes, then everything with a new optimizer
        encoder, first = model.get_layer("encoder"), plan.passes // 2
        rows = []
        if first:
            encoder.trainable = False
            rows = passes(first, cell.seed)
            encoder.trainable = True
        rows += passes(plan.passes - first, cell.seed + 1)
    return model, rows, plan


def choose(cell: Cell, x: np.ndarray, y: np.ndarray, hidden: tuple[int, ...], activation: str,
           autoencoder: Any = None, unlabeled: np.ndarray | None = None) -> selection.Selection:
    """The cell's recipe, chosen by cross-validation on its labeled images alone."""
    parts = selection.splits(y, cell.folds, cell.holdout, cell.seed) if len(cell.candidates) > 1 else []

    def score(recipe: selection.Recipe, train_at: np.ndarray, held_at: np.ndarray) -> float:
        trial = cell.model_copy(update={**recipe, "budget": len(train_at)})
        model, _, _ = train(trial, x[train_at], y[train_at], hidden, activation, autoencoder, unlabeled)
        return float(np.mean(predict_classes(model, x[held_at], trial.name) == y[held_at]))

    return selection.select(cell.candidates or ({},), parts, score)


def predict_classes(model: Any, x: np.ndarray, name: str) -> np.ndarray:
    """The model's predicted class of each image; refuses non-finite outputs."""
    probs, _ = probabilities(model, x, Path(name))
    return probs.argmax(axis=1).astype(np.uint8)


def run(cfg: Cell, split: SplitSpec, hidden: tuple[int, ...], activation: str, data_dir: Path, out: Path,
        pretrain_dir: Path | None = None) -> dict[str, Any]:
    """Choose the cell's recipe on its labeled subset, train with it on the whole subset, score it on the test split.

    Writes `model.keras`, `training_log.json`, `predictions.npy` (the predicted class of every test image, for
    paired tests between models) and `cell.json` (the subset's class counts, the recipe chosen and every candidate's
    cross-validated accuracy, the schedule, the test accuracy).
    """
    data = load_splits(data_dir, split)
    chosen = labeled_subset(data.y_train, cfg.budget, cfg.seed)
    autoencoder = load_autoencoder(pretrain_dir) if cfg.pretrained and pretrain_dir else None
    unlabeled = data.x_train if cfg.semi else None
    x, y = data.x_train[chosen], data.y_train[chosen]
    picked = choose(cfg, x, y, tuple(hidden), activation, autoencoder, unlabeled)
    final = cfg.model_copy(update=picked.chosen)
    model, rows, plan = train(final, x, y, tuple(hidden), activation, autoencoder, unlabeled)
    predicted = predict_classes(model, data.x_test, cfg.name)
    model.save(out / CELL_MODEL_FILE)
    write_training_log(rows, out / TRAINING_LOG_FILE)
    np.save(out / CELL_PREDICTIONS_FILE, predicted)
    correct = int(np.sum(predicted == data.y_test))
    summary = {
        "model": cfg.model, "budget": cfg.budget, "seed": cfg.seed,
        "class_counts": np.bincount(y, minlength=CLASSES).tolist(),
        "recipe": picked.chosen, "recipe_name": selection.describe(picked.chosen), "selection": picked.as_json(),
        "steps": plan.steps, "passes": plan.passes, "repeats": plan.repeats, "batch_size": plan.batch_size,
        "train_loss": rows[-1]["loss_mean"], "train_accuracy": rows[-1].get("accuracy"),
        "n_test": len(predicted), "correct": correct, "accuracy": correct / len(predicted),
    }
    (out / CELL_RESULT_FILE).write_text(json.dumps(summary, indent=2))
    log.info("%s: %d steps, test accuracy %.4f", cfg.name, plan.steps, summary["accuracy"])
    return summary


# The pretrained models read the pretrain artifact; the others do not, so their keys (and
# results) do not change with the pretraining.
CONTRACT = Contract(stage=STAGE, run=run, section="study", shared=("split", "hidden", "activation"),
                    reads={"data_dir": "download", "pretrain_dir": "pretrain"}, after=("validate",),
                    writes=(CELL_MODEL_FILE, TRAINING_LOG_FILE, CELL_PREDICTIONS_FILE, CELL_RESULT_FILE),
                    code=(__name__, selection.__name__, *TRAINING_CODE, "tasks.ml.semi_supervised"))


def load_predictions(cell_dir: str | Path) -> np.ndarray:
    """A stored cell's predicted class of every test image."""
    return np.load(Path(cell_dir) / CELL_PREDICTIONS_FILE)
