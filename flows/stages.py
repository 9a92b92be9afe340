"""The Prefect tasks of the pipeline: retries and cache rules of every stage, declared in one place."""

from __future__ import annotations

from typing import Any, cast
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import State
from prefect.tasks import Task, exponential_backoff

from tasks import graph, publish
from tasks.config import PipelineConfig, Stage
from tasks.download import NetworkError
from tasks.models import Progress
from tasks.store import ArtifactRef, Store

TRAINING: tuple[Stage, ...] = ("pretrain", "finetune", "baselines")
REPORT_ARTIFACT = "mnist-ae-report"
ACCURACY_ARTIFACT = "mnist-ae-accuracy"


def _network_error(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a download only when the network failed; a bad checksum will not fix itself."""
    return isinstance(state.data, NetworkError)


# Per-stage Prefect options; every stage also gets the cache rule in `stage_task`.
OPTIONS: dict[Stage, dict[str, Any]] = {
    "download": dict(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=5),
                     retry_condition_fn=_network_error),
}


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect's cache key is the store's artifact key, so a store hit shows as a Cached task run."""
    step: graph.Step = parameters["step"]
    return f"{step.stage}-{step.key}"


def _progress(stage: str) -> tuple[Progress, Any]:
    """Per-epoch log lines and a progress artifact for a training stage; returns the callback and artifact id."""
    logger = get_run_logger()
    # Called from a sync task, so Prefect returns the id itself, not a coroutine.
    artifact_id = cast(UUID, create_progress_artifact(progress=0.0, description=f"{stage}: epochs completed"))

    def report(epoch: int, epochs: int, logs: dict[str, float]) -> None:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in logs.items() if isinstance(v, int | float))
        logger.info("%s epoch %d/%d %s", stage, epoch, epochs, metrics)
        update_progress_artifact(artifact_id=artifact_id, progress=100.0 * epoch / epochs)

    return report, artifact_id


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def run_stage(step: graph.Step, config: PipelineConfig, refs: dict[str, ArtifactRef], force: bool) -> ArtifactRef:
    """Compute one stage through the store (or find it there) and hand on a small reference."""
    progress, artifact_id = _progress(step.stage) if step.stage in TRAINING else (None, None)
    ref = graph.execute(step, config, refs, Store(config.store), force=force, progress=progress)
    if artifact_id is not None:  # early stopping ends training before the last planned epoch
        update_progress_artifact(artifact_id=artifact_id, progress=100.0)
    get_run_logger().info("%s %s in %s (%.1fs)", step.stage, "found" if ref.cached else "computed",
                          ref.path, ref.duration_s)
    return ref


def stage_task(
    step: graph.Step, store: Store, force: bool
) -> Task[[graph.Step, PipelineConfig, dict[str, ArtifactRef], bool], ArtifactRef]:
    """The task for one planned stage: Prefect's cache is refreshed whenever the store lacks the artifact."""
    return run_stage.with_options(
        name=step.stage,
        task_run_name=f"{step.stage}-{step.key[:12]}",
        result_storage=store.prefect_results,
        refresh_cache=force or not step.cached,
        **OPTIONS.get(step.stage, {}),
    )


@task(name="publish")
def publish_run(config: PipelineConfig, refs: dict[str, ArtifactRef], validated: bool) -> dict[str, Any]:
    """Challenge the champion with an evaluated model not judged before, append the run history, write the report."""
    store = Store(config.store)
    run_id = flow_run.get_id()
    # Each evaluation is judged once, cached or not (publish.promote skips one already judged).
    decision = publish.promote(config, store, refs, run_id, validated) if "evaluate" in refs else None
    publish.record(config, store, refs, decision, run_id)
    if "report" not in refs:
        return {"decision": decision and decision.reason}
    paths = publish.run_report(config, store, refs, decision, run_id)
    create_markdown_artifact(key=REPORT_ARTIFACT, markdown=publish.markdown_without_figures(paths["blocks"])
                             + f"\n\nFull report with figures: `{paths['html']}`\n", description=config.report.title)
    if rows := refs["report"].summary.get("rows"):
        create_table_artifact(key=ACCURACY_ARTIFACT, table=rows, description="test accuracy per model, 95% CI")
    return {"decision": decision and decision.reason, "report": str(paths["html"])}
