"""The stage graph: what each stage depends on, how its key is made, and how it runs through the store."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tasks import baselines, download, evaluate, finetune, pretrain, report, validate
from tasks.config import PipelineConfig, Stage
from tasks.models import MODEL_FILES, Progress
from tasks.store import ArtifactRef, Store, key_of, verify

Refs = dict[str, ArtifactRef]
Runner = Callable[[PipelineConfig, Refs, Path, Progress | None], dict[str, Any]]


@dataclass(frozen=True)
class StageSpec:
    upstream: tuple[Stage, ...]
    modules: tuple[str, ...]  # their source makes the stage's code version
    section: Callable[[PipelineConfig], dict[str, Any]]  # the config the output depends on
    run: Runner


@dataclass(frozen=True)
class Step:
    """One stage of a run, planned: its key, what went into it, and whether the store already has it."""

    stage: Stage
    key: str
    inputs: dict[str, Any]
    cached: bool
    reason: str


def _dir(refs: Refs, stage: str) -> Path:
    return Path(refs[stage].path)


def data_fingerprint(config: PipelineConfig) -> str:
    """Identifies the exact images the model stages see: verified payloads plus the split."""
    return key_of({"payload": download.PAYLOAD_SHA256[config.data.dataset], "split": config.data.split()})[:16]


def _model_paths(refs: Refs) -> dict[str, Path]:
    paths = {name: _dir(refs, stage) / file for name, (stage, file) in MODEL_FILES.items() if stage in refs}
    return {name: path for name, path in paths.items() if path.exists()}


def _run_info(config: PipelineConfig, refs: Refs) -> dict[str, Any]:
    return {
        "config": reported_config(config),
        "data_fingerprint": data_fingerprint(config),
        "stages": {s: {"key": r.key, "cached": r.cached, "duration_s": r.duration_s,
                       "code_version": code_version(SPECS[cast(Stage, s)].modules)} for s, r in refs.items()},
    }


def reported_config(config: PipelineConfig) -> dict[str, Any]:
    """The config without machine-specific settings, which never change a result."""
    return config.model_dump(mode="json", by_alias=True, exclude={"store": True, "data": {"mirror", "offline"}})


SPECS: dict[Stage, StageSpec] = {
    "download": StageSpec(
        upstream=(),
        modules=("tasks.download", "tasks.idx", "tasks.data"),
        section=lambda c: {"dataset": c.data.dataset, "payload_sha256": download.PAYLOAD_SHA256[c.data.dataset]},
        run=lambda c, refs, out, progress: download.run(c.data, out),
    ),
    "validate": StageSpec(
        upstream=("download",),
        modules=("tasks.validate", "tasks.data"),
        section=lambda c: {"dataset": c.data.dataset, "validate": c.validate_.model_dump(mode="json")},
        run=lambda c, refs, out, progress: validate.run(c.validate_, _dir(refs, "download"), c.data.dataset, out),
    ),
    "pretrain": StageSpec(
        upstream=("download", "validate"),
        modules=("tasks.pretrain", "tasks.models", "tasks.data"),
        section=lambda c: {"seed": c.seed, "split": c.data.split(), "pretrain": c.pretrain.model_dump(mode="json")},
        run=lambda c, refs, out, progress: pretrain.run(
            c.pretrain, c.data.split(), _dir(refs, "download"), out, progress),
    ),
    "finetune": StageSpec(
        upstream=("download", "pretrain"),
        modules=("tasks.finetune", "tasks.models", "tasks.data"),
        section=lambda c: {"seed": c.seed, "split": c.data.split(), "finetune": c.finetune.model_dump(mode="json")},
        run=lambda c, refs, out, progress: finetune.run(
            c.finetune, c.data.split(), _dir(refs, "download"), _dir(refs, "pretrain"), out, progress),
    ),
    "baselines": StageSpec(
        upstream=("download", "validate"),
        modules=("tasks.baselines", "tasks.models", "tasks.data"),
        # The ANN baseline copies the pretrained network's shape, so only those two pretrain fields count.
        section=lambda c: {"seed": c.seed, "split": c.data.split(), "baselines": c.baselines.model_dump(mode="json"),
                           "hidden": list(c.pretrain.hidden), "activation": c.pretrain.activation},
        run=lambda c, refs, out, progress: baselines.run(
            c.baselines, c.data.split(), _dir(refs, "download"), out, progress,
            hidden=c.pretrain.hidden, activation=c.pretrain.activation),
    ),
    "evaluate": StageSpec(
        upstream=("download", "finetune", "baselines"),
        modules=("tasks.evaluate", "tasks.models", "tasks.data"),
        section=lambda c: {"split": c.data.split(), "evaluate": c.evaluate.model_dump(mode="json")},
        run=lambda c, refs, out, progress: evaluate.run(
            c.evaluate, c.data.split(), _dir(refs, "download"), _model_paths(refs), out),
    ),
    "report": StageSpec(
        upstream=("validate", "pretrain", "finetune", "baselines", "evaluate"),
        modules=("tasks.report", "tasks.document", "tasks.evaluate", "tasks.models", "tasks.pretrain", "tasks.finetune",
                 "tasks.baselines"),
        section=lambda c: {"config": reported_config(c)},
        run=lambda c, refs, out, progress: report.run(
            c.report, {s: _dir(refs, s) for s in refs}, _run_info(c, refs), out),
    ),
}


def code_version(modules: tuple[str, ...]) -> str:
    """Hash of the source files a stage's output depends on."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot find the source of {name}")
        digest.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def upstream_of(config: PipelineConfig, stage: Stage) -> tuple[Stage, ...]:
    """The stage's upstream stages that this config runs (the report adapts to what is there)."""
    return tuple(s for s in SPECS[stage].upstream if s in config.stages)


def plan(config: PipelineConfig, store: Store) -> list[Step]:
    """Keys of every stage the config runs, in order, and whether each is already stored."""
    keys: dict[str, str] = {}
    steps = []
    for stage in config.stages:
        spec = SPECS[stage]
        inputs = {
            "stage": stage,
            "code_version": code_version(spec.modules),
            "config": spec.section(config),
            "upstream": {s: keys[s] for s in upstream_of(config, stage)},
        }
        key = keys[stage] = key_of(inputs)
        cached = store.path(stage, key).exists() and verify(store.path(stage, key), key) is None
        steps.append(Step(stage, key, inputs, cached, "" if cached else why_missing(store, stage, inputs)))
    return steps


class MissingUpstream(RuntimeError):
    """A stage was asked to run alone but an artifact it needs is not in the store."""


def upstream_refs(
    steps: list[Step], only: set[Stage], store: Store, config: PipelineConfig
) -> dict[str, ArtifactRef]:
    """Store artifacts that the selected stages need but do not compute themselves."""
    needed = {u for s in only for u in upstream_of(config, s)} - only
    refs = {s.stage: store.load(s.stage, s.key) for s in steps if s.stage in needed}
    if missing := [s for s in steps if s.stage in needed and refs[s.stage] is None]:
        raise MissingUpstream(
            f"{', '.join(sorted(only))} needs stages that are not in {store.root}: "
            + "; ".join(f"{s.stage} ({s.reason})" for s in missing)
            + f". Run them first (mnist-ae run --only {','.join(s.stage for s in missing)}) or run without --only."
        )
    return {stage: ref for stage, ref in refs.items() if ref is not None}


def why_missing(store: Store, stage: str, inputs: dict[str, Any]) -> str:
    """Explain a miss against the newest stored artifact of the same stage."""
    previous = store.manifests(stage)
    if not previous:
        return "never computed"
    last = previous[0].get("key_inputs", {})
    reasons = []
    if last.get("code_version") != inputs["code_version"]:
        reasons.append("code changed")
    changed = _diff(last.get("config", {}), inputs["config"])
    if changed:
        reasons.append("config changed: " + ", ".join(changed))
    upstream = [s for s, k in inputs["upstream"].items() if last.get("upstream", {}).get(s) != k]
    if upstream:
        reasons.append("upstream changed: " + ", ".join(upstream))
    return "; ".join(reasons) or "missing or damaged"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def execute(step: Step, config: PipelineConfig, refs: Refs, store: Store, *, force: bool = False,
            progress: Progress | None = None) -> ArtifactRef:
    """Return the stage's stored artifact, or compute it from its upstream artifacts and store it."""
    import keras
    import tensorflow as tf

    spec = SPECS[step.stage]
    upstream: Refs = {s: refs[s] for s in upstream_of(config, step.stage)}

    def produce(out: Path) -> dict[str, Any]:
        # Seeding per stage (not only once per run) is what makes a stage re-run alone reproduce itself;
        # op determinism (process-wide, irreversible) makes the same seed give the same numbers.
        keras.utils.set_random_seed(config.seed)
        tf.config.experimental.enable_op_determinism()
        return spec.run(config, upstream, out, progress)

    return store.materialize(step.stage, step.key, step.inputs, produce, force=force)
