"""Test-set metrics of every classifier: accuracy with a confidence interval, per-class scores, confusion matrix."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import binomtest

from tasks.config import EvaluateConfig, SplitSpec
from tasks.data.splits import load_splits
from tasks.pipeline.contract import Contract

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
NUM_CLASSES = 10
# The claim table's order; any other model name follows, alphabetically.
MODEL_ORDER = ("softmax", "ann", "pretrained", "probe")
CI_METHOD = "wilson"
# Model pairs compared example by example: the claim's two steps, then the probe against the fine-tuned model.
PAIRS = (("pretrained", "ann"), ("ann", "softmax"), ("pretrained", "probe"))


def accuracy_ci(correct: int, n: int, confidence: float) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion `correct / n`.

    Chosen over the normal-approximation (Wald) interval because it stays inside [0, 1]
    and keeps close to its nominal coverage near 0 % and 100 % accuracy, where Wald
    collapses to a zero-width interval; it needs no simulation, unlike a bootstrap.
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    if not 0 <= correct <= n:
        raise ValueError(f"correct must lie in [0, {n}], got {correct}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    interval = binomtest(correct, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


def confusion(y_true: np.ndarray, y_pred: np.ndarray, k: int = NUM_CLASSES) -> np.ndarray:
    """The k x k count matrix, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"labels must be two 1-d arrays of one length, got {y_true.shape} and {y_pred.shape}")
    for name, labels in (("y_true", y_true), ("y_pred", y_pred)):
        if labels.size and (labels.min() < 0 or labels.max() >= k):
            raise ValueError(f"{name} has labels outside 0..{k - 1}")
    counts = np.zeros((k, k), dtype=np.int64)
    np.add.at(counts, (y_true.astype(np.int64), y_pred.astype(np.int64)), 1)
    return counts


def _ratio(num: float, den: float) -> float | None:
    return float(num / den) if den else None


def per_class(conf: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall and F1 of each class; None where a score is undefined (0 / 0)."""
    conf = np.asarray(conf)
    rows = []
    for c in range(conf.shape[0]):
        tp, support, predicted = conf[c, c], conf[c, :].sum(), conf[:, c].sum()
        precision, recall = _ratio(tp, predicted), _ratio(tp, support)
        if precision is None or recall is None:
            f1 = None
        else:
            # Both zero (no hit at all) is the worst F1, not an undefined one.
            f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append({"class": c, "support": int(support), "predicted": int(predicted),
                     "precision": precision, "recall": recall, "f1": f1})
    return rows


def metrics_for(y_true: np.ndarray, y_pred: np.ndarray, confidence: float, k: int = NUM_CLASSES) -> dict[str, Any]:
    """Every JSON-able metric of one model's test predictions."""
    conf = confusion(y_true, y_pred, k)
    n, correct = int(conf.sum()), int(np.trace(conf))
    low, high = accuracy_ci(correct, n, confidence)
    classes = per_class(conf)
    f1s = [c["f1"] for c in classes if c["f1"] is not None]
    return {
        "n": n, "correct": correct, "accuracy": correct / n, "ci_low": low, "ci_high": high,
        "macro_f1": float(np.mean(f1s)) if f1s else None,
        "per_class": classes, "confusion": conf.tolist(),
    }


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value: a binomial test of b successes in b + c trials with p = 1/2."""
    if b + c == 0:
        return 1.0
    return float(binomtest(b, b + c, 0.5).pvalue)


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


def ordered(names: Any) -> list[str]:
    """Model names in claim-table order."""
    names = set(names)
    return [n for n in MODEL_ORDER if n in names] + sorted(names - set(MODEL_ORDER))


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


@dataclass(frozen=True)
class Predictions:
    """Per-example test predictions of each model, for paired comparisons (e.g. McNemar's test)."""

    y_true: np.ndarray
    predicted: dict[str, np.ndarray]
    confidence: dict[str, np.ndarray]

    def correct(self, model: str) -> np.ndarray:
        return self.predicted[model] == self.y_true


def save_predictions(preds: Predictions, directory: Path) -> Path:
    """Store labels as uint8 and predicted-class probabilities as float32, compressed."""
    arrays: dict[str, Any] = {"y_true": preds.y_true.astype(np.uint8)}
    for name in preds.predicted:
        arrays[f"pred_{name}"] = preds.predicted[name].astype(np.uint8)
        arrays[f"prob_{name}"] = preds.confidence[name].astype(np.float32)
    path = directory / PREDICTIONS_FILE
    np.savez_compressed(path, **arrays)
    return path


def load_predictions(directory: str | Path) -> Predictions:
    with np.load(Path(directory) / PREDICTIONS_FILE) as npz:
        names = [key.removeprefix("pred_") for key in npz.files if key.startswith("pred_")]
        return Predictions(npz["y_true"], {n: npz[f"pred_{n}"] for n in names},
                           {n: npz[f"prob_{n}"] for n in names})


def as_probabilities(outputs: np.ndarray) -> tuple[np.ndarray, str]:
    """The model's outputs as class probabilities, and whether they already were ("probabilities") or not ("logits")."""
    if outputs.min() >= 0 and np.allclose(outputs.sum(axis=1), 1.0, atol=1e-3):
        return outputs, "probabilities"
    # A head trained with from_logits=True is legitimate; softmax gives the same argmax and real probabilities.
    shifted = np.exp(outputs - outputs.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True), "logits"


def predict_with(path: Path, x: np.ndarray) -> tuple[np.ndarray, str]:
    """Load a `.keras` file safely and return its class probabilities on `x`."""
    from tasks.ml.models import load_model  # Keras is imported only when a model is needed

    model = load_model(path, compile=False)  # predicting needs no optimizer, loss or compiled training step
    outputs = np.asarray(model.predict(x, batch_size=1024, verbose=0), dtype=np.float64)
    if outputs.shape != (len(x), NUM_CLASSES):
        raise ValueError(f"{Path(path).name}: expected outputs of shape {(len(x), NUM_CLASSES)}, got {outputs.shape}")
    check_finite(outputs, path)
    return as_probabilities(outputs)


def check_finite(outputs: np.ndarray, path: Path) -> None:
    """Refuse a model whose outputs hold NaN or infinity: its argmax would be an arbitrary class."""
    from tasks.ml.models import ModelError

    bad = int(np.sum(~np.isfinite(outputs).all(axis=1)))
    if bad:
        raise ModelError(f"{path}: the model outputs NaN or infinite values for {bad} of {len(outputs)} images; "
                         "it cannot be scored or served (retrain it, or roll back to the previous champion)")


def run(cfg: EvaluateConfig, split: SplitSpec, data_dir: Path, finetune_dir: Path, baselines_dir: Path,
        out: Path) -> dict[str, Any]:
    """Evaluate the fine-tuned models (with the probe when there is one) and the baselines on the test split."""
    from tasks.ml.models import MODEL_FILES

    dirs = {"finetune": Path(finetune_dir), "baselines": Path(baselines_dir)}
    paths = {name: dirs[stage] / file for name, (stage, file) in MODEL_FILES.items()}
    return evaluate_models(cfg, split, data_dir, {name: path for name, path in paths.items() if path.exists()}, out)


CONTRACT = Contract(stage="evaluate", run=run, section="evaluate", shared=("split",),
                    reads={"data_dir": "download", "finetune_dir": "finetune", "baselines_dir": "baselines"},
                    writes=(METRICS_FILE, PREDICTIONS_FILE), code=(__name__, "tasks.ml.models", "tasks.data.splits"))


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
