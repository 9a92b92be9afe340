"""Run log: one JSON line per flow run in `<store root>/run_log.jsonl`, and its trend."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.config import PipelineConfig
from tasks.data.sources import fingerprint
from tasks.document import percent
from tasks.runs.registry import Decision
from tasks.store.artifacts import ArtifactRef, Conflict, Store, key_of

log = logging.getLogger(__name__)

RUN_LOG_FILE = Path("run_log.jsonl")
OLD_RUN_LOG_FILE = Path("history") / "runs.jsonl"  # where stores kept it before the rename
LOCK = "run-log"
TREND_MODEL = "pretrained"
TREND_WINDOW = 5
TREND_TOLERANCE = 0.001  # accuracy per run (0.1 pts): below this the slope is run-to-run noise

Trend = Literal["improving", "flat", "regressing"]


class RunLogError(RuntimeError):
    """The run log file cannot be read or appended to; the message names it."""


def run_log_path(root: str | os.PathLike[str]) -> Path:
    return Store(root).root / RUN_LOG_FILE


def append(root: str | os.PathLike[str], record: dict[str, Any]) -> dict[str, Any]:
    """Append one run record (stamped with the UTC time if it has none) and fsync it; return the record.

    Expected fields: flow_run_id, flow_run_name, profile, data_fingerprint, config_hash, wall_s (the run's
    time), stages {name: {cached, duration_s (seconds computing it in this run: 0 when cached), key}},
    accuracy {model: acc}, promotion {promote, reason}.
    """
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), **record}
    line = json.dumps(record, sort_keys=True, default=str)
    store = Store(root)
    if store.bucket:
        _append_object(store, line)
        return record
    path = run_log_path(root)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with store.lock(LOCK):
            _migrate(store)
            _append_line(path, line)
    except OSError as exc:
        raise RunLogError(f"run log {path} cannot be appended to ({exc.strerror or exc}); "
                          "it was left as it is: fix or move it aside") from None
    return record


def _append_line(path: Path, line: str) -> None:
    with path.open("ab+") as fh:
        # A writer killed mid-line leaves no newline; start a fresh line so only its fragment is lost.
        fh.seek(0, os.SEEK_END)
        if fh.tell() > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
        fh.write(line.encode() + b"\n")
        fh.flush()
        os.fsync(fh.fileno())


def _migrate(store: Store) -> None:
    """Move the run log of a store written before the rename to its new place; callers hold the run log lock."""
    new, old = RUN_LOG_FILE.as_posix(), OLD_RUN_LOG_FILE.as_posix()
    if store.bucket:
        if store.read_text(new) is None and (text := store.read_text(old, errors="replace")) is not None:
            store.write_text(new, text)
            store.bucket.delete(old)
        return
    if (store.root / old).is_file() and not (store.root / new).exists():
        os.replace(store.root / old, store.root / new)
        with contextlib.suppress(OSError):
            (store.root / old).parent.rmdir()  # only if nothing else was kept there


def _append_object(store: Store, line: str) -> None:
    """Object stores cannot append: rewrite the object under the run log lock, only over the version read."""
    rel = RUN_LOG_FILE.as_posix()
    try:
        with store.lock(LOCK):
            _migrate(store)
            text = store.read_text(rel, errors="replace") or ""
            store.write_text(rel, text + ("\n" if text and not text.endswith("\n") else "") + line + "\n")
    except (OSError, UnicodeDecodeError, Conflict) as exc:
        raise RunLogError(f"run log {store.location(rel)} cannot be appended to ({exc}); "
                           "it was left as it is: fix or move it aside") from None


def read(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All run records, oldest first; torn or corrupt lines are skipped with one warning naming them."""
    store = Store(root)
    rel = RUN_LOG_FILE.as_posix()
    try:
        text = store.read_text(rel, errors="replace")
        if text is None:  # a store written before the rename, until its next run migrates it
            rel = OLD_RUN_LOG_FILE.as_posix()
            text = store.read_text(rel, errors="replace")
    except (OSError, UnicodeDecodeError) as exc:
        path = store.location(rel)
        raise RunLogError(f"run log {path} cannot be read ({getattr(exc, 'strerror', None) or exc}); "
                           "it was left as it is: fix or move it aside") from None
    if text is None:
        return []
    records, skipped = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if _well_formed(record):
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        path = store.location(rel)
        shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
        log.warning("run log: skipping %d unreadable line(s) of %s (line %s; a run interrupted while writing?)",
                    len(skipped), path, shown)
    return records


def _well_formed(record: Any) -> bool:
    """Whether a parsed line has the shape the trend and the report read."""
    if not isinstance(record, dict):
        return False
    accuracy, stages = record.get("accuracy", {}), record.get("stages", {})
    return (isinstance(accuracy, dict) and all(v is None or isinstance(v, int | float) for v in accuracy.values())
            and isinstance(stages, dict) and all(isinstance(v, dict) for v in stages.values())
            and isinstance(record.get("promotion") or {}, dict))


def models(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records that evaluated a model no earlier record had evaluated, oldest first.

    A run that found its evaluation in the store (a fully cached run, a re-run) scored the same models again:
    it is one point of the trend, not a new one. Records without an evaluation key (written before it was
    recorded) count unless every one of their stages was cached.
    """
    seen: set[str] = set()
    found = []
    for r in records:
        stages = r.get("stages", {})
        key = (stages.get("evaluate") or {}).get("key")
        if key is None and stages and all(s.get("cached") for s in stages.values()):
            continue
        if key is not None:
            if key in seen:
                continue
            seen.add(key)
        found.append(r)
    return found


def accuracies(records: list[dict[str, Any]], model: str) -> list[float]:
    """The accuracy of one model in every record that has it, oldest first."""
    return [r["accuracy"][model] for r in records if r.get("accuracy", {}).get(model) is not None]


def trend(records: list[dict[str, Any]], model: str = TREND_MODEL, window: int = TREND_WINDOW,
          tolerance: float = TREND_TOLERANCE) -> Trend:
    """Classify the recent trend of a model's accuracy over distinct trained models (`models`).

    Rule: fit a least-squares line to the model's accuracy over its last `window` distinct models;
    a slope above `tolerance` (accuracy per model) is "improving", below -`tolerance`
    "regressing", anything else (including fewer than two models) "flat".
    """
    recent = accuracies(models(records), model)[-window:]
    if len(recent) < 2:
        return "flat"
    slope = float(np.polyfit(np.arange(len(recent)), recent, 1)[0])
    if slope > tolerance:
        return "improving"
    if slope < -tolerance:
        return "regressing"
    return "flat"


def model_names(records: list[dict[str, Any]]) -> list[str]:
    """Every model name that appears in the records, in first-seen order."""
    return list(dict.fromkeys(name for r in records for name in r.get("accuracy", {})))


def plural(count: int, noun: str) -> str:
    """'1 run', '2 runs'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def trend_figure(records: list[dict[str, Any]], path: Path) -> Path:
    """Plot the test accuracy (in %) of each model over the distinct trained models into a PNG."""
    # The object-oriented API renders with Agg and leaves pyplot's global state alone.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    trained = models(records)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    for name in model_names(trained):
        runs = [(i, 100 * acc) for i, r in enumerate(trained, 1)
                if (acc := r.get("accuracy", {}).get(name)) is not None]
        ax.plot(*zip(*runs, strict=True), marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.set_xlim(0.5, max(len(trained), 1) + 0.5)
    ax.set_xlabel("trained model (runs that found their models in the store are not new points)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Test accuracy of {plural(len(trained), 'trained model')} ({TREND_MODEL}: {trend(records)})")
    ax.grid(alpha=0.3)
    if model_names(trained):
        fig.legend(loc="outside right upper", fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def trend_table(records: list[dict[str, Any]], last: int = 10) -> list[dict[str, str]]:
    """Rows for a report table of the last `last` runs, all with the same columns, accuracies in %."""
    start = max(len(records) - last, 0)
    shown = records[start:]
    names = model_names(shown)
    first_of: dict[str, int] = {}
    for run, r in enumerate(records, 1):
        key = (r.get("stages", {}).get("evaluate") or {}).get("key")
        if key is not None:
            first_of.setdefault(key, run)
    rows = []
    for run, r in enumerate(shown, start + 1):
        stages = r.get("stages", {})
        computed = [s for s, v in stages.items() if not v.get("cached")]
        key = (stages.get("evaluate") or {}).get("key")
        if key is not None and first_of.get(key, run) < run:
            models_from = f"as run {first_of[key]}"
        else:
            models_from = "new" if "evaluate" in computed or key is None and computed else "from the store"
        promotion = r.get("promotion") or {}
        wall = r.get("wall_s")
        rows.append({
            "Run": str(run),
            "Date (UTC)": str(r.get("at", ""))[:16].replace("T", " "),
            "Computed": f"{len(computed)}/{len(stages)}",
            "Models": models_from,
            "Seconds": "" if wall is None else f"{wall:,.1f}",
            **{name: percent(r.get("accuracy", {}).get(name)) for name in names},
            "Promoted": {True: "yes", False: "no"}.get(promotion.get("promote") is True, "-")
            if isinstance(promotion.get("promote"), bool) else "-",
        })
    return rows


def record(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
           flow_run_id: str | None, *, flow_run_name: str | None = None,
           wall_s: float | None = None) -> dict[str, Any]:
    """Append a flow run's record to the store's run log.

    A stage found in the store cost this run no computing: its `duration_s` is 0, not the seconds the run that
    built it spent; its key says which artifact it was, so a run that re-scored the same models is not a new point.
    """
    accuracy = refs["evaluate"].summary.get("accuracy", {}) if "evaluate" in refs else {}
    return append(store.url, {
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run_name,
        "profile": config.profile,
        "dataset": config.data.dataset,
        "data_fingerprint": fingerprint(config.data),
        "config_hash": key_of(config.reported())[:16],
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "stages": {s: {"cached": r.cached, "duration_s": 0.0 if r.cached else round(r.duration_s, 3),
                       "key": r.key[:16]} for s, r in refs.items()},
        "accuracy": accuracy,
        "promotion": None if decision is None else {"promote": decision.promote, "reason": decision.reason},
    })
