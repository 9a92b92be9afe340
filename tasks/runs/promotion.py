"""Promotion after a run: this run's evaluated model judged against the dataset's champion, once."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import PipelineConfig
from tasks.data.sources import fingerprint
from tasks.data.splits import load_splits
from tasks.ml.inference import predict_with
from tasks.ml.predictions import load_predictions
from tasks.runs import registry
from tasks.runs.registry import MODEL, Decision, Registry, RegistryError
from tasks.stages.files import METRICS_FILE, MODEL_FILES
from tasks.store.artifacts import ArtifactError, ArtifactRef, Store

log = logging.getLogger(__name__)


CHALLENGER = MODEL  # the notebook's model: encoder pretrained as an autoencoder, then fine-tuned


BASELINE = "softmax"  # the quality gate: a challenger must beat the softmax regression of its own run


def candidate(config: PipelineConfig, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """This run's fine-tuned model as a registry candidate."""
    metrics = json.loads((Path(refs["evaluate"].path) / METRICS_FILE).read_text())["models"][CHALLENGER]
    stage, file = MODEL_FILES[CHALLENGER]
    return {"key": refs[stage].key, "model_path": str(Path(refs[stage].path) / file),
            "accuracy": metrics["accuracy"], "n": metrics["n"], "data_fingerprint": fingerprint(config.data),
            "evaluate_key": refs["evaluate"].key}


def _champion_correct(store: Store, champion: dict[str, Any], config: PipelineConfig,
                      refs: dict[str, ArtifactRef]) -> np.ndarray | None:
    """The champion's per-example correctness on this run's test set (re-scored when the test set changed).

    None when it must be re-scored but this run did not load the data (a run with --only).
    """
    evaluate_key = champion.get("evaluate_key") or "-"
    if champion.get("data_fingerprint") == fingerprint(config.data) and store.problem("evaluate", evaluate_key) is None:
        return load_predictions(store.path("evaluate", evaluate_key)).correct(CHALLENGER)
    if "download" not in refs:
        return None
    log.info("champion %s was scored on other data; scoring it on this run's test set", champion["key"][:12])
    splits = load_splits(refs["download"].path, config.data.split())
    try:
        model = Registry(store.url, config.data.dataset).model(champion["key"])
        probabilities, _ = predict_with(model, splits.x_test)
    except ArtifactError as exc:
        raise RegistryError(f"champion {exc}: it cannot be re-scored. Re-run the pipeline with the settings that "
                            "trained it, or `mnist-ae rollback`; this run's model is judged by the next run") from None
    return probabilities.argmax(axis=1) == splits.y_test


def decide(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], flow_run_id: str | None,
           validated: bool) -> Decision | None:
    """Decide by the rule (`registry.decide`) whether this run's evaluated model becomes champion, once; record it.

    Whether the evaluation was computed in this run or found in the store, it is judged unless the
    registry already holds an event for it (so a run whose publishing failed is judged by a later run,
    and a rollback is never undone); None when it was not judged now.
    """
    challenger = candidate(config, refs)
    predictions = load_predictions(refs["evaluate"].path)
    correct = predictions.correct(CHALLENGER)
    baseline = predictions.correct(BASELINE) if BASELINE in predictions.predicted else None

    def judge(champion: dict[str, Any] | None) -> Decision | None:
        if champion and champion["key"] == challenger["key"]:
            acc = float(correct.mean())
            return Decision(False, f"this run's model {challenger['key'][:12]} is already the champion",
                            acc, acc, 0, 0, 1.0)
        champion_correct = None if champion is None else _champion_correct(store, champion, config, refs)
        if champion is not None and champion_correct is None:
            log.warning("model %s not judged: the champion must be re-scored on this run's test set, which needs "
                        "the download stage; a run that includes it will judge the model", challenger["key"][:12])
            return None
        return registry.decide(champion_correct, correct, config.promote, validation_passed=validated,
                               baseline_correct=baseline)

    event = Registry(store.url, config.data.dataset).record_decision(challenger, judge, flow_run_id)
    return None if event is None else Decision(**event["decision"])


def stored_candidates(store: Store, dataset: str) -> dict[str, dict[str, Any]]:
    """Every fine-tuned model of `dataset` with an intact evaluation in the store, as registry candidates by key.

    So a model whose run failed before it was judged can still be promoted by hand. The data
    fingerprint is left out, which makes a later challenger re-score such a champion rather than trust it.
    """
    stage, file = MODEL_FILES[CHALLENGER]
    found: dict[str, dict[str, Any]] = {}
    for manifest in store.manifests("evaluate"):
        inputs = manifest.get("key_inputs", {})
        upstream = inputs.get("upstream", {})
        key, accuracy = upstream.get(stage), manifest.get("summary", {}).get("accuracy", {}).get(CHALLENGER)
        if key is None or accuracy is None or _dataset_of(store, upstream.get("download")) != dataset:
            continue
        found.setdefault(key, {"key": key, "model_path": f"{stage}/{key}/{file}", "accuracy": accuracy,
                               "n": manifest["summary"].get("n_test"), "data_fingerprint": None,
                               "evaluate_key": manifest.get("key")})
    return found


def _dataset_of(store: Store, download_key: str | None) -> str | None:
    """The dataset of a stored download artifact, from its manifest's summary (what the download stage returned)."""
    try:
        return store.manifest("download", download_key or "-")["summary"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
