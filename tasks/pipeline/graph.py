"""The stage graph, derived from the stages' contracts: keys, what the store holds, and running a stage through it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tasks.config import ConfigError, PipelineConfig, Stage
from tasks.data.sources import fingerprint
from tasks.ml.progress import Progress
from tasks.pipeline.contract import Contract
from tasks.stages import baselines, download, evaluate, finetune, pretrain, report, validate
from tasks.store.artifacts import ABSENT, ArtifactRef, Store, key_of

CONTRACTS: dict[str, Contract] = {c.stage: c for c in (
    download.CONTRACT, validate.CONTRACT, pretrain.CONTRACT, finetune.CONTRACT, baselines.CONTRACT,
    evaluate.CONTRACT, report.CONTRACT)}


def shared_settings(config: PipelineConfig) -> dict[str, Any]:
    """The run-wide settings a contract can name in `shared`, as JSON values (they go into keys as they are)."""
    return {
        "seed": config.seed,
        "split": dict(config.data.split()),
        "dataset": config.data.dataset,
        # The encoder's shape, which the ANN baseline copies.
        "hidden": list(config.pretrain.hidden),
        "activation": config.pretrain.activation,
        "config": config.reported(),
        "data_fingerprint": fingerprint(config.data),
    }


def section_of(config: PipelineConfig, stage: str) -> BaseModel:
    section: BaseModel = getattr(config, CONTRACTS[stage].section)
    return section


def upstream_of(config: PipelineConfig, stage: str) -> tuple[Stage, ...]:
    """The stage's upstream stages that this config runs (the report adapts to what is there)."""
    return tuple(s for s in config.stages if s in CONTRACTS[stage].upstream)


def check_config(config: PipelineConfig) -> None:
    """Every stage reads only stages that run before it; the report alone may do without some of them."""
    for stage in config.stages:
        optional = stage == "report"
        if missing := [s for s in CONTRACTS[stage].upstream if s not in config.stages and not optional]:
            raise ConfigError(f"invalid configuration: stages: stage {stage} needs {', '.join(missing)} "
                              f"(got {list(config.stages)})")


@dataclass(frozen=True)
class Step:
    """One stage of a run, planned: its key, what went into it, and whether the store already has it."""

    stage: Stage
    key: str
    inputs: dict[str, Any]
    cached: bool
    reason: str


def plan(config: PipelineConfig, store: Store) -> list[Step]:
    """Keys of every stage the config runs, in order, and whether each is already stored."""
    check_config(config)
    shared = shared_settings(config)
    keys: dict[str, str] = {}
    steps = []
    for stage in config.stages:
        inputs = CONTRACTS[stage].key_inputs(section_of(config, stage), shared, keys)
        key = keys[stage] = key_of(inputs)
        problem = store.problem(stage, key)
        steps.append(Step(stage, key, inputs, problem is None, "" if problem is None else why_missing(
            store, stage, key, inputs, problem)))
    return steps


class MissingUpstream(RuntimeError):
    """A stage was asked to run alone but an artifact it needs is not in the store."""


def stored_upstream(config: PipelineConfig, steps: list[Step], only: set[Stage],
                    store: Store) -> dict[str, ArtifactRef]:
    """The stored artifacts that the selected stages read but do not compute; all missing ones are named at once."""
    by_stage = {s.stage: s for s in steps}
    refs: dict[str, ArtifactRef] = {}
    missing: list[Step] = []
    pending = [u for s in only for u in upstream_of(config, s) if u not in only]
    while pending:
        stage = pending.pop()
        if stage in refs or by_stage[stage] in missing:
            continue
        if ref := store.load(stage, by_stage[stage].key):
            refs[stage] = ref
        else:  # to compute it, what it reads must be there too
            missing.append(by_stage[stage])
            pending += upstream_of(config, stage)
    if missing:
        missing.sort(key=steps.index)
        raise MissingUpstream(
            f"{', '.join(s for s in config.stages if s in only)} needs stages that are not in {store.url}: "
            + "; ".join(f"{s.stage} ({s.reason})" for s in missing)
            + f". Run them first (mnist-ae run --only {','.join(s.stage for s in missing)}) or run without --only."
        )
    return refs


def why_missing(store: Store, stage: str, key: str, inputs: dict[str, Any], problem: str | None = None) -> str:
    """Explain a miss: a damaged artifact, or what changed against the newest stored artifact of the stage."""
    problem = problem or store.problem(stage, key)
    if problem != ABSENT:
        return f"stored artifact is damaged: {problem}; the next run recomputes it"
    if left := store.incomplete(stage, key):
        return f"stored artifact is incomplete: {left}; the next run recomputes it"
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
    return "; ".join(reasons) or "missing"


def _diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new)) for d in _diff(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [f"{prefix.rstrip('.')} {old!r} -> {new!r}"]


def execute(stage: str, section: BaseModel, upstream: list[ArtifactRef], shared: dict[str, Any], store: Store, *,
            force: bool = False, progress: Progress | None = None, contract: Contract | None = None) -> ArtifactRef:
    """Return the stage's stored artifact, or compute it from the upstream artifacts it was given and store it.

    The key is made from exactly what the stage receives: its config section, the shared settings its contract
    names, and the keys of the given upstream artifacts. `contract` is for artifacts outside the pipeline's
    stages (the study's cells); by default the stage's own.
    """
    contract = contract or CONTRACTS[stage]
    refs = {ref.stage: store.localized(ref) for ref in upstream}  # computed on another machine, maybe
    if unexpected := sorted(set(refs) - set(contract.upstream)):
        raise ValueError(
            f"stage {stage} does not read {', '.join(unexpected)}; it reads {', '.join(contract.upstream)}.")
    inputs = contract.key_inputs(section, shared, {s: r.key for s, r in refs.items()})

    def produce(out: Path) -> dict[str, Any]:
        kwargs: dict[str, Any] = {name: shared[name] for name in contract.shared}
        kwargs |= {param: Path(refs[s].path) for param, s in contract.reads.items() if s in refs}
        if contract.progress:
            kwargs["progress"] = progress
        summary = contract.run(cfg=section, out=out, **kwargs)
        if unwritten := [f for f in contract.writes if not (out / f).is_file()]:
            raise RuntimeError(f"stage {stage} did not write {', '.join(unwritten)}")
        return summary

    return store.materialize(stage, key_of(inputs), inputs, produce, force=force)
