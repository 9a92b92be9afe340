"""The pipeline flow: download, validate, pretrain, fine-tune, baselines, evaluate, report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import State

from flows.stages import publish_run, stage_task
from tasks import graph
from tasks.config import Stage, check_stages, load_config
from tasks.store import ArtifactRef, Store


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
    config = load_config(profile, overrides or {}, store)
    check_stages(config, stages or [], force or [])
    logger = get_run_logger()
    the_store = Store(config.store)
    the_store.check_writable()  # a bad store path fails here, named, not after the first stage's work
    steps = graph.plan(config, the_store)
    only = set(stages or config.stages)
    refs = graph.upstream_refs(steps, only, the_store, config)
    for step in steps:
        if step.stage not in only:
            continue
        forced = step.stage in (force or [])
        state: State[ArtifactRef] = stage_task(step, the_store, forced)(step, config, refs, forced, return_state=True)
        ref: ArtifactRef = state.result()
        if state.name == "Cached":  # Prefect's stored result may name the store where it was first computed
            ref = ref.model_copy(update={"cached": True, "path": str(the_store.path(step.stage, step.key))})
        refs[step.stage] = ref
    for stage, ref in refs.items():
        logger.info("%-9s %-8s %s", stage, "cached" if ref.cached else "computed", ref.path)
    # Validation passed in this run, or earlier for exactly this data (the flow stops when it fails).
    validated = "validate" in refs or any(s.stage == "validate" and s.cached for s in steps)
    published = publish_run(config, refs, validated)
    if published.get("report"):
        logger.info("report: %s", published["report"])
    return {"flow_run_id": flow_run.get_id(), "store": str(the_store.root),
            "stages": {s: r.model_dump(mode="json") for s, r in refs.items()}, **published}
