"""Champion/challenger model registry: which fine-tuned model serves, why, and every decision that led there."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import PromoteConfig
from tasks.document import percent
from tasks.ml.stats import mcnemar_exact
from tasks.stages.files import MODEL_FILES, OLD_MODEL_FILES
from tasks.store.artifacts import ABSENT, ArtifactError, Conflict, Store

log = logging.getLogger(__name__)

REGISTRY_DIR = "registry"
MODEL = "pretrained"  # the kind of model a registry holds (tasks.stages.files.MODEL_FILES): the fine-tuned autoencoder
KEY = re.compile(r"[0-9a-f]+")  # artifact keys are sha256 hex digests
OLD_EVENTS_KEY = "history"  # what registries written before the rename called their events


class RegistryError(RuntimeError):
    """A registry operation cannot be carried out (e.g. nothing to roll back to)."""


@dataclass(frozen=True)
class Decision:
    """Whether a challenger replaces the champion, with the numbers behind it."""

    promote: bool
    reason: str
    champion_accuracy: float | None
    challenger_accuracy: float
    b: int | None  # champion right, challenger wrong
    c: int | None  # challenger right, champion wrong
    p_value: float | None
    baseline_accuracy: float | None = None  # the softmax regression of the challenger's own run


def decide(
    champion_correct: np.ndarray | None,
    challenger_correct: np.ndarray,
    cfg: PromoteConfig,
    validation_passed: bool,
    *,
    baseline_correct: np.ndarray | None,
) -> Decision:
    """Apply the promotion rule to per-example correctness of the models on the same test set.

    Before any comparison with the champion (and for the first model too) the challenger must pass the
    quality gate: beat the softmax-regression baseline of its own run, significantly by McNemar's exact
    test at `cfg.alpha`, and reach `cfg.min_accuracy`.
    """
    challenger = _as_bool(challenger_correct, "challenger_correct")
    acc = float(challenger.mean())
    baseline = None if baseline_correct is None else _as_bool(baseline_correct, "baseline_correct")
    base = None if baseline is None else float(baseline.mean())
    if not validation_passed:
        return Decision(False, f"data validation failed: challenger {percent(acc)} never promoted",
                        None, acc, None, None, None, base)
    if failed := _gate(challenger, baseline, cfg):
        return Decision(False, f"challenger {percent(acc)} {failed}: not promoted", None, acc, None, None, None,
                        base)
    if champion_correct is None:
        return Decision(True, f"first model: challenger {percent(acc)} beats its run's softmax baseline "
                        f"{percent(base or 0.0)}: becomes champion", None, acc, None, None, None, base)
    champion = _as_bool(champion_correct, "champion_correct")
    if champion.shape != challenger.shape:
        raise ValueError(f"champion and challenger were scored on different test sets "
                         f"({champion.size} vs {challenger.size} examples)")
    champ_acc = float(champion.mean())
    b = int(np.sum(champion & ~challenger))
    c = int(np.sum(~champion & challenger))
    p = mcnemar_exact(b, c)
    # (c - b) / n is the accuracy difference without the rounding of two separate means.
    gain = (c - b) / challenger.size
    head = f"challenger {percent(acc)} vs champion {percent(champ_acc)} ({gain * 100:+.2f} pts)"
    if gain <= 0 or gain < cfg.min_accuracy_gain - 1e-12:
        needed = f"gain required > 0 and >= {cfg.min_accuracy_gain * 100:.2f} pts"
        promote, reason = False, f"{head}, {needed}: champion kept"
    elif p >= cfg.alpha:
        promote, reason = False, f"{head}, McNemar exact p={p:.3g} >= {cfg.alpha:g}: champion kept"
    else:
        promote, reason = True, f"{head}, McNemar exact p={p:.3g} < {cfg.alpha:g}: promoted"
    return Decision(promote, reason, champ_acc, acc, b, c, p, base)


def _gate(challenger: np.ndarray, baseline: np.ndarray | None, cfg: PromoteConfig) -> str | None:
    """Why a challenger fails the quality gate, or None when it passes."""
    if baseline is None:
        return "has no softmax baseline in its run to be compared with"
    if baseline.shape != challenger.shape:
        raise ValueError(f"challenger and baseline were scored on different test sets "
                         f"({challenger.size} vs {baseline.size} examples)")
    base = percent(float(baseline.mean()))
    b, c = int(np.sum(baseline & ~challenger)), int(np.sum(~baseline & challenger))
    if c <= b:
        return f"does not beat its run's softmax baseline {base}"
    if (p := mcnemar_exact(b, c)) >= cfg.alpha:
        return f"is not significantly better than its run's softmax baseline {base} (McNemar exact p={p:.3g})"
    if challenger.mean() < cfg.min_accuracy:
        return f"is below the minimum accuracy {percent(cfg.min_accuracy)} (promote.min_accuracy)"
    return None


def _as_bool(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of per-example correctness, got shape {arr.shape}")
    return arr.astype(bool)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Registry:
    """`<store root>/registry/<dataset>.json`: a dataset's champion and its append-only events (key `events`).

    Every change (and every promotion decision, which reads the champion) happens under the store's
    lock for this file and replaces it atomically, so concurrent flow runs never lose each other's events.
    """

    def __init__(self, root: str | os.PathLike[str], dataset: str = "mnist") -> None:
        self.store = Store(root)
        self._rel = f"{REGISTRY_DIR}/{dataset}.json"
        self.path = self.store.root / self._rel  # the local file (of an object store's cache: messages use location)
        self.location = self.store.location(self._rel)
        self._lock = f"registry-{dataset}"

    def champion(self) -> dict[str, Any] | None:
        return self._read()["champion"]

    def events(self) -> list[dict[str, Any]]:
        return self._read()["events"]

    def champion_model(self) -> Path | None:
        """Absolute path of the champion's model file, verified against its artifact; None without a champion."""
        champ = self.champion()
        if champ is None:
            return None
        try:
            return self.model(champ["key"])
        except ArtifactError as exc:
            raise RegistryError(f"champion {exc}. Re-run the pipeline with the settings that trained it (the store "
                                "rebuilds a damaged artifact), or go back with `mnist-ae rollback`") from None

    def model(self, key: str) -> Path:
        """The model file of the fine-tune artifact `key` in this store, verified against its manifest.

        Only the key is trusted: a registry's `model_path` is written for readers, but a hand-edited one
        must not make the registry hand out another file.
        """
        stage, file = MODEL_FILES[MODEL]
        if not KEY.fullmatch(key):
            raise ArtifactError(f"{key!r} in registry {self.location} is not an artifact key")
        try:
            return self.store.verified(f"{stage}/{key}/{file}")
        except ArtifactError:
            if old := self._old_model_file(stage, key):
                return self.store.verified(f"{stage}/{key}/{old}")
            if self.store.problem(stage, key) == ABSENT:  # asked only on failure: verifying once is enough
                raise ArtifactError(f"{key[:12]} in registry {self.location} names no {stage} artifact in store "
                                    f"{self.store.url}") from None
            raise

    def _old_model_file(self, stage: str, key: str) -> str | None:
        """The model's file name in an artifact written before model files took their model's name, if it is one."""
        old = OLD_MODEL_FILES.get(MODEL)
        try:
            return old if old in self.store.manifest(stage, key).get("files", {}) else None
        except (OSError, ValueError):  # absent or unreadable: the caller reports the artifact as it is
            return None

    def judged(self, evaluate_key: str) -> bool:
        """Whether any registry event already concerns the model of this evaluation."""
        return _judged(self.events(), evaluate_key)

    def candidates(self) -> dict[str, dict[str, Any]]:
        """Every model ever evaluated or promoted, by key (latest record wins)."""
        return {e["candidate"]["key"]: e["candidate"] for e in self.events() if "candidate" in e}

    def record_decision(self, candidate: dict[str, Any], judge: Callable[[dict[str, Any] | None], Decision | None],
                        flow_run_id: str | None) -> dict[str, Any] | None:
        """Judge the candidate against the current champion and record the outcome, as one locked step.

        Holding the lock while judging means two runs finishing together are compared one after the
        other, so the second is judged against the first's promotion, not the champion both started with.
        An evaluation is judged once: None when an event already concerns it (re-judging would undo a
        rollback), or when `judge` defers by returning None.
        """
        with self.store.lock(self._lock):
            state = self._read()
            if candidate.get("evaluate_key") and _judged(state["events"], candidate["evaluate_key"]):
                return None
            decision = judge(state["champion"])
            if decision is None:
                return None
            event = {"event": "promote" if decision.promote else "reject", "at": _now(), "by": flow_run_id,
                     "reason": decision.reason, "candidate": self._normalise(candidate), "decision": asdict(decision)}
            return self._apply_locked(event, promote=decision.promote)

    def promote(self, key: str, candidate: dict[str, Any] | None, by: str, reason: str) -> dict[str, Any] | None:
        """Manual override: make `key` champion whatever the rule says (candidate looked up when None).

        None, with nothing recorded, when `key` is the champion already.
        """
        if candidate is None:
            candidate = self.candidates().get(key)
            if candidate is None:
                raise RegistryError(f"no evaluated model with key {key}; known keys: {', '.join(self.candidates())}")
        if candidate["key"] != key:
            raise RegistryError(f"candidate key {candidate['key']} does not match {key}")
        try:
            self.model(key)
        except ArtifactError as exc:
            raise RegistryError(f"cannot promote {key[:12]}: {exc}") from None
        event = {"event": "manual", "at": _now(), "by": by, "reason": reason, "candidate": self._normalise(candidate)}
        with self.store.lock(self._lock):
            champion = self._read()["champion"]
            if champion is not None and champion["key"] == key:
                return None
            return self._apply_locked(event, promote=True)

    def rollback(self, by: str) -> dict[str, Any]:
        """Make the previous champion the champion again and return the new champion."""
        with self.store.lock(self._lock):
            state = self._read()
            if state["champion"] is None:
                raise RegistryError(f"cannot roll back: registry {self.location} has no champion to roll back from")
            lineage = _lineage(state["events"])
            if len(lineage) < 2:
                status = "no champion" if not lineage else f"only champion {lineage[-1]['key'][:12]}"
                raise RegistryError(f"cannot roll back: there is no previous champion ({status})")
            previous, current = lineage[-2], lineage[-1]
            reason = f"rollback from {current['key'][:12]} to {previous['key'][:12]}"
            event = {"event": "rollback", "at": _now(), "by": by, "reason": reason, "candidate": previous}
            state["champion"] = _champion(event)
            state["events"].append(event)
            self._write(state)
        log.info("registry: %s by %s", reason, by)
        return state["champion"]

    def _apply_locked(self, event: dict[str, Any], promote: bool) -> dict[str, Any]:
        state = self._read()
        if promote:
            state["champion"] = _champion(event)
        state["events"].append(event)
        self._write(state)
        log.info("registry: %s %s (%s)", event["event"], event["candidate"]["key"][:12], event["reason"])
        return event

    def _normalise(self, candidate: dict[str, Any]) -> dict[str, Any]:
        """The candidate with its model path relative to the store root, so the store can move."""
        path = Path(candidate["model_path"])
        if path.is_absolute() and path.resolve().is_relative_to(self.store.root):
            path = path.resolve().relative_to(self.store.root)
        return {**candidate, "model_path": path.as_posix()}

    def _read(self) -> dict[str, Any]:
        """The registry document; a file that is not one is an error naming it, and is never overwritten."""
        try:
            text = self.store.read_text(self._rel)
        except (OSError, UnicodeDecodeError) as exc:
            raise self._corrupt(f"unreadable: {getattr(exc, 'strerror', None) or exc}") from None
        if text is None:
            return {"champion": None, "events": []}
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise self._corrupt(f"not valid JSON: {exc}") from None
        if isinstance(state, dict) and "events" not in state and OLD_EVENTS_KEY in state:
            state["events"] = state.pop(OLD_EVENTS_KEY)  # written before the rename; the next write migrates it
        if problem := _malformed(state):
            raise self._corrupt(problem)
        return state

    def _write(self, state: dict[str, Any]) -> None:
        """Replace the registry document (read under the same lock); refused if another writer changed it since."""
        try:
            self.store.write_text(self._rel, json.dumps(state, indent=2, sort_keys=True, default=str))
        except Conflict:
            raise RegistryError(f"registry {self.location} was changed by another run while this one held its "
                                "lock (its lease expired?); nothing was written: run the command again") from None

    def _corrupt(self, problem: str) -> RegistryError:
        return RegistryError(f"registry file {self.location} is damaged ({problem}); it was left untouched. Restore it "
                             f"from a backup, or move it aside (e.g. to {self.path.name}.bad) to start a new registry")


def _malformed(state: Any) -> str | None:
    """What makes a parsed registry document unusable, or None."""
    if not isinstance(state, dict) or not {"champion", "events"} <= set(state):
        return "expected an object with 'champion' and 'events'"
    if not isinstance(state["events"], list):
        return "'events' is not a list"
    for number, event in enumerate(state["events"], start=1):
        if not isinstance(event, dict) or not isinstance(event.get("event"), str) or _bad_model(event.get("candidate")):
            return f"event {number} lacks an event name or a candidate with key and model_path"
    if state["champion"] is not None and _bad_model(state["champion"]):
        return "'champion' lacks key or model_path"
    return None


def _bad_model(entry: Any) -> bool:
    return not (isinstance(entry, dict) and isinstance(entry.get("key"), str)
                and isinstance(entry.get("model_path"), str))


def _judged(events: list[dict[str, Any]], evaluate_key: str) -> bool:
    return any(e["candidate"].get("evaluate_key") == evaluate_key for e in events)


def _champion(event: dict[str, Any]) -> dict[str, Any]:
    cand = event["candidate"]
    return {"key": cand["key"], "model_path": cand["model_path"],
            "metrics": {"accuracy": cand["accuracy"], "n": cand["n"]},
            "data_fingerprint": cand["data_fingerprint"], "evaluate_key": cand.get("evaluate_key"),
            "promoted_at": event["at"], "by": event["by"], "reason": event["reason"]}


def _lineage(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stack of champions the events imply: promotions push, rollbacks pop."""
    stack: list[dict[str, Any]] = []
    for event in events:
        if event["event"] == "rollback":
            stack.pop()
        elif event["event"] in ("promote", "manual") and (not stack or stack[-1]["key"] != event["candidate"]["key"]):
            stack.append(event["candidate"])
    return stack
