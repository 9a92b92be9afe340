"""The pipeline flow: download, validate, pretrain, fine-tune, baselines, evaluate, report."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.runners import Runner, running_on, task_runner
from flows.stages import (
    PipelineRun,
    baselines,
    download,
    evaluate,
    finetune,
    pretrain,
    publish_run,
    report,
    validate,
)
from tasks.config import Stage, check_stages, load_config


@flow(name="mnist-ae-pipeline")
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
    config = load_config(profile, overrides or {}, store)
    check_stages(config, stages or [], force or [])
    run = PipelineRun(config, only=stages, force=force)
    with running_on(task_runner(runner, dask_address)):
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
    published = publish_run(config, refs, run.validated(refs))
    if published.get("report"):
        logger.info("report: %s", published["report"])
    return {"flow_run_id": flow_run.get_id(), "store": run.store.url,
            "stages": {s: r.model_dump(mode="json") for s, r in refs.items()}, **published}
