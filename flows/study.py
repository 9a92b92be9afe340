"""The label-efficiency study flow: the pipeline's pretraining, then every (budget, seed, model) cell, then a report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run
from prefect.states import Completed, State

from flows import events
from flows.runners import Runner, running_on, task_runner
from flows.stages import PipelineRun, download, pretrain, validate
from tasks.config import PipelineConfig, SplitSpec, Stage, StudyConfig, check_study, load_config
from tasks.data.splits import load_splits
from tasks.document import BLOCKS_FILE, Image, load_blocks, percent, to_markdown
from tasks.pipeline import graph
from tasks.store.artifacts import ArtifactRef, Store, key_of
from tasks.study import cells as study
from tasks.study import report as study_report
from tasks.study import selection

STUDY_ARTIFACT = "mnist-ae-study"
STUDY_TABLE_ARTIFACT = "mnist-ae-study-accuracy"
STUDY_LINK_ARTIFACT = "mnist-ae-study-link"
UPSTREAM: list[Stage] = ["download", "validate", "pretrain"]


# As with the pipeline's stages, the store decides what is cached: a stored cell is verified and returned.
@task(cache_policy=NO_CACHE, task_run_name="cell-{cell.model}-{cell.budget}-seed{cell.seed}")
def study_cell(cell: study.Cell, data: ArtifactRef, checked: ArtifactRef, autoencoder: ArtifactRef | None,
               shared: dict[str, Any], store: str) -> State[ArtifactRef]:
    """Find one cell's artifact in the store or train it on its labeled subset and score it."""
    upstream = [data, checked] + ([autoencoder] if cell.pretrained and autoencoder else [])
    ref = graph.execute(study.STAGE, cell, upstream, shared, Store(store), contract=study.CONTRACT)
    get_run_logger().info("%s %s: test accuracy %.4f (%s)", cell.name, "found" if ref.cached else "computed",
                          ref.summary["accuracy"], ref.path)
    return Completed(name="Cached" if ref.cached else "Completed", data=ref)


@task(cache_policy=NO_CACHE)
def study_report_task(cfg: StudyConfig, cells: list[ArtifactRef], data: ArtifactRef, split: SplitSpec,
                      protocol: list[str], store: str) -> ArtifactRef:
    """Write the study's report as an artifact keyed by its cells, and publish it to Prefect."""
    reports = Store(store)
    cells = [reports.localized(ref) for ref in cells]  # computed on other machines, maybe
    results = [study_report.CellResult.of(ref.summary, ref.path) for ref in cells]
    y_test = load_splits(reports.localized(data).path, split).y_test  # scoring only: every choice was made before
    inputs = study_report.key_inputs(cfg, [ref.key for ref in cells])
    ref = reports.materialize(
        study_report.STAGE, key_of(inputs), inputs,
        lambda out: study_report.write(cfg, results, y_test, protocol, out))
    page = f"{ref.path}/{study_report.REPORT_NAME}.html"
    blocks = [b for b in load_blocks(Path(ref.path) / BLOCKS_FILE) if not isinstance(b, Image)]
    create_markdown_artifact(key=STUDY_ARTIFACT, markdown=to_markdown(blocks) + f"\n\nFull report: `{page}`\n",
                             description=study_report.TITLE)
    create_link_artifact(key=STUDY_LINK_ARTIFACT, link=Path(page).as_uri(), link_text=Path(page).name,
                         description=f"{study_report.TITLE}: the full report with figures, on the machine that ran "
                                     "the flow")
    create_table_artifact(key=STUDY_TABLE_ARTIFACT, table=ref.summary["table"],
                          description="test accuracy per label budget and model, mean over seeds, 95% interval")
    return ref


def protocol(config: PipelineConfig, autoencoder: ArtifactRef) -> list[str]:
    """What every cell did, in words, for the report."""
    s = config.study
    large = [b for b in s.budgets if b >= s.large_from]
    grids = "; ".join(f"{m}: {', '.join(selection.describe(r) for r in selection.recipes(g))}"
                      for m, g in s.search.items() if m in s.models) or "none"
    return [
        f"Label budgets {', '.join(f'{b:,}' for b in s.budgets)} of the {config.training_images():,} training "
        f"images; seeds 0 to {s.seeds - 1}"
        + (f" (0 to {min(s.seeds, s.large_seeds) - 1} from {s.large_from:,} labels on)" if large else "")
        + ". Each seed draws class-balanced subsets (one label per class in turn), nested across budgets.",
        f"Pretraining: the pipeline's own artifact (pretrain {autoencoder.key[:12]}), trained on all training "
        "images without their labels.",
        f"Every model chooses its recipe from its grid ({grids}) by the mean accuracy on the held-out parts of "
        f"{s.folds} class-stratified folds of the budget's own labels"
        + (f" ({percent(s.holdout, 0)} of the budget held out once from {s.large_from:,} labels on)" if large else "")
        + ", then trains with it on all of the budget's labels. Neither the "
        f"{config.data.validation_size:,} validation images nor the test labels are used for any choice.",
        f"Unless a recipe says otherwise, a cell trains with {s.optimizer} at learning rate {s.learning_rate:g}, a "
        f"zero-initialised softmax head, batch min({s.batch_size}, budget), for max({s.min_steps}, {s.epochs} x "
        "ceil(budget / batch)) optimizer steps (rounded up to whole passes over the subset): no early stopping.",
        "The ANN has the pretrained encoder's shape and starts from a random initialisation; softmax regression "
        "reads the pixels. All models are scored on the same test images. A verdict says \"sure\" only when both "
        "the test set's McNemar test and the interval of the paired per-seed differences exclude no difference.",
    ]


@flow(name="label-study")
def label_study(
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    store: str | None = None,
    runner: Runner = "sequential",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """How many labels is pretraining worth? Train each model on each label budget and seed, and compare.

    Args:
        profile: the pipeline profile whose data, validation and pretraining the study reuses.
        overrides: dotted config overrides, e.g. {"study.seeds": 5, "study.budgets": [100, 1000]}.
        store: store root (default: the config's, `artifacts/`).
        runner: "sequential" (one cell at a time, in this process) or "dask" (cells side by side).
        dask_address: an existing Dask scheduler (tcp://host:8786) for the dask runner; default: a local cluster.
    """
    config = load_config(profile, overrides or {}, store)
    check_study(config)
    run = PipelineRun(config, only=UPSTREAM, force=None)  # the same stages, keys and store as the pipeline's
    shared = graph.shared_settings(config)
    shared = {name: shared[name] for name in study.CONTRACT.shared}
    cells = study.grid(config.study, config.baselines.init)
    with running_on(task_runner(runner, dask_address)):
        data = run.stage(download, config.data)
        checked = run.stage(validate, config.validate_, data)
        autoencoder = run.stage(pretrain, config.pretrain, data, checked)
        # Cells that need no pretraining are submitted first, so they can train beside it.
        scratch = [c for c in cells if not c.pretrained]
        pretrained = [c for c in cells if c.pretrained]
        futures: list[PrefectFuture[Any]] = []
        for group, encoder in ((scratch, None), (pretrained, autoencoder)):
            if group:
                futures += study_cell.map(group, unmapped(data), unmapped(checked), unmapped(encoder),
                                          unmapped(shared), unmapped(run.store.url))
        refs = [future.result() for future in futures]
        upstream = run.results()
    report = study_report_task(config.study, refs, upstream["download"], config.data.split(),
                               protocol(config, upstream["pretrain"]), run.store.url)
    page = f"{report.path}/{study_report.REPORT_NAME}.html"
    events.study_finished(config.data.dataset, config.profile, report.key, page, report.summary["verdicts"])
    logger = get_run_logger()
    for sentence in report.summary["verdicts"]:
        logger.info("%s", sentence)
    computed = sum(not r.cached for r in refs)
    logger.info("%d cells: %d computed, %d from the store; report: %s", len(refs), computed, len(refs) - computed,
                report.path)
    return {"flow_run_id": flow_run.get_id(), "store": run.store.url,
            "report": page, "verdicts": report.summary["verdicts"],
            "upstream": {s: r.model_dump(mode="json") for s, r in upstream.items()},
            "cells": [r.model_dump(mode="json") for r in refs]}
