"""The Prefect tasks of the pipeline: one per stage with its retries, the run they belong to, and publishing."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect import task
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import TaskRun
from prefect.futures import PrefectFuture
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from prefect.states import Completed, State
from prefect.tasks import Task, exponential_backoff
from pydantic import BaseModel

from flows import events
from flows.artifacts import accuracy_table, prefect_markdown
from tasks.config import PipelineConfig, Stage
from tasks.data import intake
from tasks.data.intake import Intake
from tasks.data.sources import NetworkError
from tasks.ml.progress import EpochEnd, Progress
from tasks.pipeline import graph
from tasks.runs import promotion, run_log, run_report
from tasks.runs.registry import Registry
from tasks.store.artifacts import ArtifactRef, Store
from tasks.study import report as study_report

REPORT_ARTIFACT = "mnist-ae-report"
REPORT_LINK_ARTIFACT = "mnist-ae-report-link"
ACCURACY_ARTIFACT = "mnist-ae-accuracy"


class StageContext(BaseModel):
    """What a stage task needs besides its config section and upstream artifacts."""

    stage: Stage
    store: str
    force: bool
    shared: dict[str, Any]  # the run-wide settings its contract names


def _progress(stage: str) -> tuple[Progress, Any]:
    """Per-epoch log lines and a progress artifact for a training stage; returns the callback and artifact id."""
    logger = get_run_logger()
    # Called from a sync task, so Prefect returns the id itself, not a coroutine.
    artifact_id = cast(UUID, create_progress_artifact(progress=0.0, key=f"{stage}-progress",
                                                      description=f"{stage}: training starts"))

    def report(event: EpochEnd) -> None:
        metrics = " ".join(f"{k}={v:.4f}" for k, v in event.logs.items())
        logger.info("%s: %s epoch %d/%d %s", stage, event.model, event.epoch, event.epochs, metrics)
        update_progress_artifact(artifact_id=artifact_id, progress=round(100.0 * event.done, 1),
                                 description=f"{stage}: {100 * event.done:.0f} % done, {event.model} epoch "
                                             f"{event.epoch}/{event.epochs}")

    return report, artifact_id


# The artifact store, not Prefect's cache, decides whether a stage is computed: a stored artifact is verified
# on every run, wherever the task runs, and a hit is reported as a "Cached" state.
@task(cache_policy=NO_CACHE)
def run_stage(section: BaseModel, *upstream: ArtifactRef, context: StageContext) -> State[ArtifactRef]:
    """Find one stage's artifact in the store or compute it from its config section and upstream artifacts."""
    stage = context.stage
    trains = graph.CONTRACTS[stage].progress
    progress, artifact_id = _progress(stage) if trains else (None, None)
    ref = graph.execute(stage, section, list(upstream), context.shared, Store(context.store),
                        force=context.force, progress=progress)
    if artifact_id is not None:  # early stopping ends training before the last planned epoch
        outcome = "found in the store, nothing trained" if ref.cached else "trained"
        update_progress_artifact(artifact_id=artifact_id, progress=100.0, description=f"{stage}: 100 % done, {outcome}")
    get_run_logger().info("%s %s in %s (%.1fs)", stage, "found" if ref.cached else "computed", ref.path,
                          ref.duration_s)
    return Completed(name="Cached" if ref.cached else "Completed", data=ref)


def _network_error(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
    """Retry a download only when the network failed; a bad checksum will not fix itself."""
    return isinstance(state.data, NetworkError)


download = run_stage.with_options(name="download", retries=3, retry_condition_fn=_network_error,
                                  retry_delay_seconds=exponential_backoff(backoff_factor=5))
validate = run_stage.with_options(name="validate")
pretrain = run_stage.with_options(name="pretrain")
finetune = run_stage.with_options(name="finetune")
baselines = run_stage.with_options(name="baselines")
evaluate = run_stage.with_options(name="evaluate")
report = run_stage.with_options(name="report")

Upstream = PrefectFuture[ArtifactRef] | ArtifactRef | None


@task(name="intake", cache_policy=NO_CACHE)
def take_in(config: PipelineConfig, validate_new: bool) -> Intake:
    """The incoming batches the training data includes: new ones validated now (accepted or quarantined) when
    `validate_new`, else only those accepted earlier (a run that takes the data artifact from the store)."""
    store = Store(config.store)
    store.check_writable()  # verdicts are stored; a bad store path fails here, named, before any work
    if not validate_new:
        return intake.look(config.data, store)
    admitted = intake.admit(config, store)
    events.batches_judged(config.data.dataset, admitted.verdicts)
    return admitted


class PipelineRun:
    """The stages of one flow run: each is submitted, taken from the store (`--only`), or skipped (not in the
    profile), and the results are gathered in pipeline order."""

    def __init__(self, config: PipelineConfig, only: list[Stage] | None, force: list[Stage] | None) -> None:
        self.config, self.store = config, Store(config.store)
        self.store.check_writable()  # a bad store path fails here, named, before any work
        self.steps = {step.stage: step for step in graph.plan(config, self.store)}
        self.only = set(only or config.stages)
        self.force = set(force or ())
        self.shared = graph.shared_settings(config)
        self.stored = graph.stored_upstream(config, list(self.steps.values()), self.only, self.store)
        self.submitted: dict[str, PrefectFuture[ArtifactRef]] = {}

    def stage(self, task: Task[..., Any], section: BaseModel, *upstream: Upstream) -> Upstream:
        """Submit the stage `task` is named after, with its config section and the upstream artifacts it reads."""
        stage = cast(Stage, task.name)
        if stage not in self.config.stages:
            return None
        if stage not in self.only:
            return self.stored.get(stage)
        contract = graph.CONTRACTS[stage]
        context = StageContext(stage=stage, store=self.store.url, force=stage in self.force,
                               shared={name: self.shared[name] for name in contract.shared})
        future: PrefectFuture[ArtifactRef] = task.with_options(
            task_run_name=f"{stage}-{self.steps[stage].key[:12]}",
        ).submit(section, *(u for u in upstream if u is not None), context=context)
        self.submitted[stage] = future
        return future

    def results(self) -> dict[str, ArtifactRef]:
        """Every stage's artifact, in pipeline order; the first failed stage's error is raised."""
        refs = dict(self.stored)
        for stage in self.config.stages:
            if stage in self.submitted:
                # A stage computed on another machine is read here from this machine's verified copy.
                refs[stage] = self.store.localized(self.submitted[stage].result())
        return {s: refs[s] for s in self.config.stages if s in refs}

    def validated(self, refs: dict[str, ArtifactRef]) -> bool:
        """Validation passed in this run, or earlier for exactly this data (the flow stops when it fails)."""
        return "validate" in refs or ("validate" in self.steps and self.steps["validate"].cached)


@task(name="publish")
def publish_run(config: PipelineConfig, refs: dict[str, ArtifactRef], validated: bool,
                batches: Intake | None = None, wall_s: float | None = None) -> dict[str, Any]:
    """Challenge the champion with an evaluated model not judged before, append the run log, write the report
    (with a section on the incoming batches when the run takes them in)."""
    store = Store(config.store)
    run = run_report.RunInfo(id=flow_run.get_id(), name=flow_run.get_name(), at=datetime.now(UTC), wall_s=wall_s)
    # Each evaluation is judged once, cached or not (promotion.decide skips one already judged).
    decision = None
    if "evaluate" in refs:
        # The champion before the decision, for the event; the registry's own record of it is the exact one.
        before = Registry(store.url, config.data.dataset).champion()
        decision = promotion.decide(config, store, refs, run.id, validated)
        if decision is not None:
            events.model_judged(config.data.dataset, decision, promotion.candidate(config, refs), before)
    run_log.record(config, store, refs, decision, run.id, flow_run_name=run.name, wall_s=wall_s)
    if "report" not in refs:
        return {"decision": decision and decision.reason}
    section = (intake.report_section(batches, refs["download"].summary, config.data.split())
               if batches is not None and "download" in refs else [])
    study = (page, study_report.verdicts_beside(page)) if (page := study_report.latest(store)) else None
    paths = run_report.run_report(config, store, refs, decision, run, section, study)
    return {"decision": decision and decision.reason, "report": str(paths["html"]), "blocks": str(paths["blocks"])}


def publish_artifacts(config: PipelineConfig, refs: dict[str, ArtifactRef], published: dict[str, Any]) -> None:
    """The run's report, a link to its full HTML file and the accuracy table as Prefect artifacts of the flow run
    itself (not of a task run)."""
    if "blocks" not in published:
        return
    description = f"{config.report.title}: profile {config.profile}, {config.data.dataset}"
    create_markdown_artifact(key=REPORT_ARTIFACT, markdown=prefect_markdown(Path(published["blocks"])),
                             description=description)
    html = Path(published["report"])
    create_link_artifact(key=REPORT_LINK_ARTIFACT, link=html.as_uri(), link_text=f"{html.parent.name}/{html.name}",
                         description=f"{description}: the full report with figures, on the machine that ran the flow")
    reported = refs["report"].summary
    if rows := accuracy_table(reported):
        n = reported.get("n_test")
        create_table_artifact(key=ACCURACY_ARTIFACT, table=rows, description=(
            f"Test accuracy per model on {n:,} test images, profile {config.profile}. "
            if isinstance(n, int) else "Test accuracy per model. ") + (reported.get("verdict") or ""))


def run_name() -> str:
    """A flow run's name: profile, dataset and UTC start time, so runs can be told apart in the UI's lists."""
    parameters = flow_run.get_parameters()
    overrides = parameters.get("overrides") or {}
    dataset = overrides.get("data.dataset", "mnist")
    return f"{parameters.get('profile', 'default')}-{dataset}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def run_tags(config: PipelineConfig, runner: str) -> list[str]:
    """Tags to filter runs by in the UI: profile, dataset and task runner."""
    return [f"profile:{config.profile}", f"dataset:{config.data.dataset}", f"runner:{runner}"]


def tag_flow_run(tags: list[str]) -> None:
    """Add `tags` to the current flow run (a deployment's own tags are kept)."""
    run_id = flow_run.get_id()
    if run_id is None:
        return
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(UUID(run_id)).tags or []
        client.update_flow_run(UUID(run_id), tags=list(dict.fromkeys([*current, *tags])))
