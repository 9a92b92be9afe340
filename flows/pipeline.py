"""The pipeline flow: download, validate, pretrain, fine-tune, baselines, evaluate, report."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.runtime import flow_run

from flows.runners import Runner, running_on, task_runner
from flows.stages import (
    PipelineRun,
    baselines,
    download,
    evaluate,
    finetune,
    pretrain,
    publish_artifacts,
    publish_run,
    report,
    run_name,
    run_tags,
    tag_flow_run,
    take_in,
    validate,
)
from tasks.config import Stage, check_stages, load_config
from tasks.pipeline import graph


@flow(name="mnist-ae-pipeline", flow_run_name=run_name)
def pipeline(
    profile: str = "default",
    overrides: dict[str, Any] | None = None,
    stages: list[Stage] | None = None,
    force: list[Stage] | None = None,
    store: str | None = None,
    runner: Runner = "sequential",
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Run the stages of a profile through the artifact store; stored stages are taken from it.

    Args:
        profile: seed, seed-part2, default or quick.
        overrides: dotted config overrides, e.g. {"finetune.learning_rate": 0.1}.
        stages: run only these stages; the artifacts they read must already be in the store.
        force: recompute these stages even when the store has them.
        store: store root (default: the config's, `artifacts/`).
        runner: "sequential" (one stage at a time, in this process) or "dask" (independent stages side by side).
        dask_address: an existing Dask scheduler (tcp://host:8786) for the dask runner; default: a local cluster.
    """
    started = time.monotonic()
    config = load_config(profile, overrides or {}, store)
    check_stages(config, stages or [], force or [])
    graph.check_config(config)
    # New batches are validated before any key is planned, so the data artifact's key covers exactly the accepted
    # ones and a quarantined batch never reaches training. A run that takes the data from the store validates none.
    batches = take_in(config, "download" in (stages or config.stages)) if config.data.incoming else None
    if batches is not None:
        config = batches.apply(config)
    tag_flow_run(run_tags(config, runner))
    run = PipelineRun(config, only=stages, force=force)
    with tags(*run_tags(config, runner)), running_on(task_runner(runner, dask_address)):
        data = run.stage(download, config.data)
        checked = run.stage(validate, config.validate_, data)
        autoencoder = run.stage(pretrain, config.pretrain, data, checked)
        classifier = run.stage(finetune, config.finetune, data, autoencoder)
        # The baselines need no autoencoder, so they train beside pretraining and fine-tuning.
        baseline_models = run.stage(baselines, config.baselines, data, checked)
        evaluation = run.stage(evaluate, config.evaluate, data, classifier, baseline_models)
        run.stage(report, config.report, checked, autoencoder, classifier, baseline_models, evaluation)
        refs = run.results()

    logger = get_run_logger()
    for stage, ref in refs.items():
        logger.info("%-9s %-8s %s", stage, "cached" if ref.cached else "computed", ref.path)
    published = publish_run(config, refs, run.validated(refs), batches, wall_s=time.monotonic() - started)
    publish_artifacts(config, refs, published)
    if published.get("report"):
        logger.info("report: %s", published["report"])
    return {"flow_run_id": flow_run.get_id(), "store": run.store.url,
            "stages": {s: r.model_dump(mode="json") for s, r in refs.items()},
            "batches": None if batches is None else asdict(batches), **published}
