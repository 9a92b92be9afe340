"""The pipeline flow: download, validate, pretrain, fine-tune, baselines, evaluate, report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from flows.stages import stage_task
from tasks import graph, publish
from tasks.config import PipelineConfig, Stage, load_config
from tasks.store import ArtifactRef, Store


class MissingUpstream(RuntimeError):
    """A stage was asked to run alone but an artifact it needs is not in the store."""


def _configure(profile: str, overrides: dict[str, Any] | None, store: str | None) -> PipelineConfig:
    return load_config(profile, {**(overrides or {}), **({"store": store} if store else {})})


def _upstream_refs(
    steps: list[graph.Step], only: set[str], store: Store, config: PipelineConfig
) -> dict[str, ArtifactRef]:
    """Store artifacts that the selected stages need but do not compute themselves."""
    needed = {u for s in only for u in graph.upstream_of(config, s)} - only  # type: ignore[arg-type]
    refs = {s.stage: store.load(s.stage, s.key) for s in steps if s.stage in needed}
    if missing := [s for s in steps if s.stage in needed and refs[s.stage] is None]:
        raise MissingUpstream(
            f"{', '.join(sorted(only))} needs stages that are not in {store.root}: "
            + "; ".join(f"{s.stage} ({s.reason})" for s in missing)
            + f". Run them first (mnist-ae run --only {','.join(s.stage for s in missing)}) or run without --only."
        )
    return {stage: ref for stage, ref in refs.items() if ref is not None}


REPORT_ARTIFACT = "mnist-ae-report"
ACCURACY_ARTIFACT = "mnist-ae-accuracy"


@task(name="publish")
def publish_run(config: PipelineConfig, refs: dict[str, ArtifactRef], validated: bool) -> dict[str, Any]:
    """Promote or keep the champion, append the run history, write the run report and its Prefect artifacts."""
    store = Store(config.store)
    run_id = flow_run.get_id()
    decision = publish.promote(config, store, refs, run_id, validated) if "evaluate" in refs else None
    publish.record(config, store, refs, decision, run_id)
    if "report" not in refs:
        return {"decision": decision and decision.reason}
    paths = publish.run_report(store, refs, decision, run_id)
    create_markdown_artifact(key=REPORT_ARTIFACT, markdown=publish.markdown_without_figures(paths["blocks"])
                             + f"\n\nFull report with figures: `{paths['html']}`\n", description=config.report.title)
    if rows := refs["report"].summary.get("rows"):
        create_table_artifact(key=ACCURACY_ARTIFACT, table=rows, description="test accuracy per model, 95% CI")
    return {"decision": decision and decision.reason, "report": str(paths["html"])}


@flow(name="mnist-ae-pipeline")
def pipeline(
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    stages: list[Stage] | None = None,
    force: list[Stage] | None = None,
    store: str | None = None,
) -> dict[str, Any]:
    """Run the stages of a profile through the artifact store; cached stages are taken from it.

    Args:
        profile: seed, seed-part2, default or quick.
        overrides: dotted config overrides, e.g. {"finetune.learning_rate": 0.1}.
        stages: run only these stages; their upstream artifacts must already be in the store.
        force: recompute these stages even when the store has them.
        store: store root (default: the config's, `artifacts/`).
    """
    config = _configure(profile, overrides, store)
    unknown = set(stages or []) | set(force or [])
    if missing := sorted(unknown - set(config.stages)):
        raise ValueError(f"stages {missing} are not part of profile {profile!r} ({', '.join(config.stages)})")
    logger = get_run_logger()
    the_store = Store(config.store)
    steps = graph.plan(config, the_store)
    only = set(stages or config.stages)
    refs = _upstream_refs(steps, only, the_store, config)
    for step in steps:
        if step.stage not in only:
            continue
        forced = step.stage in (force or [])
        state = stage_task(step, the_store, forced)(step, config, refs, forced, return_state=True)
        ref: ArtifactRef = state.result()
        refs[step.stage] = ref.model_copy(update={"cached": True}) if state.name == "Cached" else ref
    for stage, ref in refs.items():
        logger.info("%-9s %-8s %s", stage, "cached" if ref.cached else "computed", ref.path)
    # Validation passed in this run, or earlier for exactly this data (the flow stops when it fails).
    validated = "validate" in refs or any(s.stage == "validate" and s.cached for s in steps)
    published = publish_run(config, refs, validated)
    if published.get("report"):
        logger.info("report: %s", published["report"])
    return {"flow_run_id": flow_run.get_id(), "store": str(the_store.root),
            "stages": {s: r.model_dump(mode="json") for s, r in refs.items()}, **published}
