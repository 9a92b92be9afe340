"""Where the stages run: one after another in the flow's process, or on a Dask cluster (local or existing)."""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from concurrent.futures.thread import _WorkItem
from contextlib import contextmanager
from typing import Any, Literal

from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

Runner = Literal["sequential", "dask"]
RUNNERS: tuple[Runner, ...] = ("sequential", "dask")
DASK_ADDRESS_ENV = "MNIST_AE_DASK_ADDRESS"


class _Sequential(ThreadPoolTaskRunner[Any]):
    """One stage at a time in one worker thread, which a Ctrl-C of the flow stops too."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> None:
        # Ctrl-C interrupts only the flow's thread, which would then wait here for the running stage to finish:
        # minutes of training. The interrupt is raised in the stage's thread too, as Prefect raises a task's
        # timeout in a worker thread (prefect/_internal/concurrency/cancellation.py), so the stage stops at its
        # next Python line, its partial output is not stored, and its task run ends as crashed. Only in a thread
        # running a stage: the executor hands the exception to that stage's future, an idle one would log a crash.
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt):
            frames = sys._current_frames()
            for ident in self._worker_thread_ids:
                frame = frames.get(ident)
                while frame is not None and frame.f_code is not _WorkItem.run.__code__:
                    frame = frame.f_back
                if frame is not None:
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                               ctypes.py_object(KeyboardInterrupt))
        super().__exit__(exc_type, exc_value, traceback)


def task_runner(runner: Runner, dask_address: str | None = None) -> TaskRunner[Any]:
    """The Prefect task runner for a run.

    `sequential` runs one stage at a time in the flow's own process (the reference). `dask` runs independent
    stages side by side: on the cluster at `dask_address` (or $MNIST_AE_DASK_ADDRESS), else on a temporary
    LocalCluster with one single-threaded worker process per core. Worker processes, not threads, because
    Keras's seeding and TensorFlow's op determinism are process-wide.
    """
    if runner == "sequential":
        return _Sequential()
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
