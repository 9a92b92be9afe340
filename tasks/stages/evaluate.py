"""Test-set metrics of every classifier: accuracy with a confidence interval, per-class scores, confusion matrix."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import EvaluateConfig, SplitSpec
from tasks.data.splits import load_splits
from tasks.ml.inference import predict_with
from tasks.ml.predictions import Predictions, save_predictions
from tasks.ml.stats import mcnemar_exact, metrics_for, ordered
from tasks.pipeline.contract import Contract
from tasks.stages.files import METRICS_FILE, MODEL_FILES, PREDICTIONS_FILE

log = logging.getLogger(__name__)

CI_METHOD = "wilson"
# Model pairs compared example by example: the claim's two steps, then the probe against the fine-tuned model.
PAIRS = (("pretrained", "ann"), ("ann", "softmax"), ("pretrained", "probe"))


def paired(y_true: np.ndarray, predicted: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """McNemar's exact test for each pair in PAIRS present: who is right where the other is wrong."""
    rows = []
    for first, second in PAIRS:
        if first in predicted and second in predicted:
            a, b = predicted[first] == y_true, predicted[second] == y_true
            only_first, only_second = int(np.sum(a & ~b)), int(np.sum(b & ~a))
            rows.append({"models": [first, second], "only_first_right": only_first,
                         "only_second_right": only_second, "p_value": mcnemar_exact(only_first, only_second)})
    return rows


def best_of(models: dict[str, dict[str, Any]]) -> str:
    """The most accurate model; a tie goes to the one earlier in claim-table order."""
    names = ordered(models)
    return max(names, key=lambda n: (models[n]["accuracy"], -names.index(n)))


def assemble(models: dict[str, dict[str, Any]], confidence: float) -> dict[str, Any]:
    """The metrics.json document from each model's `metrics_for` result."""
    if not models:
        raise ValueError("no model metrics to assemble")
    names = ordered(models)
    return {"confidence": confidence, "ci_method": CI_METHOD, "n_test": models[names[0]]["n"],
            "order": names, "best_model": best_of(models), "models": {n: models[n] for n in names}}


def run(cfg: EvaluateConfig, split: SplitSpec, data_dir: Path, finetune_dir: Path, baselines_dir: Path,
        out: Path) -> dict[str, Any]:
    """Evaluate the fine-tuned models (with the probe when there is one) and the baselines on the test split."""
    dirs = {"finetune": Path(finetune_dir), "baselines": Path(baselines_dir)}
    paths = {name: dirs[stage] / file for name, (stage, file) in MODEL_FILES.items()}
    return evaluate_models(cfg, split, data_dir, {name: path for name, path in paths.items() if path.exists()}, out)


CONTRACT = Contract(stage="evaluate", run=run, section="evaluate", shared=("split",),
                    reads={"data_dir": "download", "finetune_dir": "finetune", "baselines_dir": "baselines"},
                    writes=(METRICS_FILE, PREDICTIONS_FILE),
                    code=(__name__, "tasks.ml.saved", "tasks.ml.stats", "tasks.ml.inference", "tasks.ml.predictions",
                          "tasks.data.splits"))


def evaluate_models(
    cfg: EvaluateConfig, split: SplitSpec, data_dir: Path, model_paths: dict[str, Path], out: Path
) -> dict[str, Any]:
    """Evaluate each model file on the test split; write `metrics.json` and `predictions.npz` into `out`.

    `model_paths` maps a model name ("softmax", "ann", "pretrained", optionally "probe") to its
    `.keras` file. metrics.json is `assemble(...)`: {"confidence", "ci_method", "n_test", "order",
    "best_model", "models": {name: metrics_for(...) plus "output" ("probabilities" or "logits")}} plus
    "paired": `paired(...)`, McNemar's exact test between the claim's neighbouring models.
    Returns the accuracies, their intervals and the best model.
    """
    if not model_paths:
        raise ValueError("no models to evaluate")
    splits = load_splits(data_dir, split)
    y_true = splits.y_test
    models: dict[str, dict[str, Any]] = {}
    predicted, prob_of_predicted = {}, {}
    for name in ordered(model_paths):
        probs, kind = predict_with(model_paths[name], splits.x_test)
        if kind == "logits":
            log.warning("model %s outputs logits, not probabilities; applied softmax", name)
        predicted[name] = probs.argmax(axis=1)
        prob_of_predicted[name] = probs.max(axis=1)
        models[name] = {**metrics_for(y_true, predicted[name], cfg.confidence), "output": kind}
        log.info("%s: test accuracy %.4f [%.4f, %.4f]", name, models[name]["accuracy"],
                 models[name]["ci_low"], models[name]["ci_high"])
    save_predictions(Predictions(y_true, predicted, prob_of_predicted), out)
    metrics = {**assemble(models, cfg.confidence), "paired": paired(y_true, predicted)}
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return {
        "n_test": metrics["n_test"], "best_model": metrics["best_model"],
        "accuracy": {n: m["accuracy"] for n, m in models.items()},
        "ci": {n: [m["ci_low"], m["ci_high"]] for n, m in models.items()},
    }
