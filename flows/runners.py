"""Where the stages run: one after another in the flow's process, or on a Dask cluster (local or existing)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

Runner = Literal["sequential", "dask"]
RUNNERS: tuple[Runner, ...] = ("sequential", "dask")
DASK_ADDRESS_ENV = "MNIST_AE_DASK_ADDRESS"


def task_runner(runner: Runner, dask_address: str | None = None) -> TaskRunner[Any]:
    """The Prefect task runner for a run.

    `sequential` runs one stage at a time in the flow's own process (the reference). `dask` runs independent
    stages side by side: on the cluster at `dask_address` (or $MNIST_AE_DASK_ADDRESS), else on a temporary
    LocalCluster with one single-threaded worker process per core. Worker processes, not threads, because
    Keras's seeding and TensorFlow's op determinism are process-wide.
    """
    if runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if runner != "dask":
        raise ValueError(f"runner: unknown runner {runner!r}; choose one of {', '.join(RUNNERS)}")
    from prefect_dask import DaskTaskRunner

    address = dask_address or os.environ.get(DASK_ADDRESS_ENV) or None
    if address:
        return DaskTaskRunner(address=address)
    # Workers report to this run's Prefect API, even a temporary local one, rather than each starting its own.
    env = {"PREFECT_API_URL": str(get_client().api_url)}
    return DaskTaskRunner(cluster_kwargs={"processes": True, "threads_per_worker": 1, "dashboard_address": None,
                                          "env": env})


@contextmanager
def running_on(runner: TaskRunner[Any]) -> Iterator[None]:
    """Submit the flow's tasks to `runner` inside this block (the runner is chosen per run, not per flow)."""
    context = FlowRunContext.get()
    if context is None:
        raise RuntimeError("running_on() must be used inside a flow run")
    with runner as started, context.model_copy(update={"task_runner": started}):
        yield
