"""The flow on real Dask clusters: a LocalCluster of worker processes, and a scheduler and workers started with
the `dask` command line, as a team's existing cluster would be. Results must equal the sequential runner's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.settings import PREFECT_API_URL

from flows.pipeline import pipeline
from tasks.config import load_config

DASK = Path(sys.executable).with_name("dask")
STAGES = list(load_config("quick").stages)


pytestmark = pytest.mark.usefixtures("prefect_api", "mirror_env")  # one Prefect API per module


def run(store: Path, runner: str, **params) -> dict:
    return pipeline(profile="quick", store=str(store), runner=runner, **params)


def metrics(result: dict) -> dict:
    """Everything a run measured: the evaluation's metrics file and every training stage's training log."""
    stages = result["stages"]
    found = {"metrics": json.loads((Path(stages["evaluate"]["path"]) / "metrics.json").read_text())}
    for stage, file in (("pretrain", "training_log.json"), ("finetune", "pretrained_training_log.json")):
        found[stage] = json.loads((Path(stages[stage]["path"]) / file).read_text())
    for row in (r for stage in ("pretrain", "finetune") for r in found[stage]):
        row.pop("seconds")
    return found


def task_runs(flow_run_id: str) -> dict[str, TaskRun]:
    """The flow run's stage task runs by stage (task runs are named `<stage>-<key prefix>`)."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name.split("-")[0]: r for r in runs if r.name.split("-")[0] in STAGES}


def task_states(flow_run_id: str) -> dict[str, str]:
    return {stage: r.state.name for stage, r in task_runs(flow_run_id).items() if r.state}


def upstream_stages(runs: dict[str, TaskRun], stage: str) -> set[str]:
    """The stages the API records as the task run's inputs: the edges of the UI's run graph."""
    names = {r.id: name for name, r in runs.items()}
    return {names[i.id] for inputs in runs[stage].task_inputs.values() for i in inputs if getattr(i, "id", None)}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> dict:
    return run(tmp_path_factory.mktemp("sequential") / "store", "sequential")


def check_same_and_cached(store: Path, runner: str, sequential: dict, **params) -> dict:
    """A first run computes exactly the sequential run's results; a second one finds every stage stored."""
    first = run(store, runner, **params)
    assert not any(r["cached"] for r in first["stages"].values())
    assert {s: r["key"] for s, r in first["stages"].items()} == {s: r["key"] for s, r in sequential["stages"].items()}
    assert metrics(first) == metrics(sequential)
    # Every stage ran as a task of this flow run, reported to its API from the Dask worker processes.
    assert task_states(first["flow_run_id"]) == {s: "Completed" for s in STAGES}
    second = run(store, runner, **params)
    assert all(r["cached"] for r in second["stages"].values())
    assert task_states(second["flow_run_id"]) == {s: "Cached" for s in STAGES}
    return first


def test_local_cluster_matches_the_sequential_run_and_caches(sequential, tmp_path):
    first = check_same_and_cached(tmp_path / "store", "dask", sequential)
    runs = task_runs(first["flow_run_id"])
    # The run graph: baselines hangs off the validated data, beside pretrain -> finetune; evaluate joins them.
    assert upstream_stages(runs, "baselines") == {"download", "validate"}
    assert upstream_stages(runs, "finetune") == {"download", "pretrain"}
    assert upstream_stages(runs, "evaluate") == {"download", "finetune", "baselines"}
    # And it ran that way: baselines started before fine-tuning ended.
    assert runs["validate"].end_time <= runs["baselines"].start_time < runs["finetune"].end_time


@pytest.fixture
def dask_cluster(tmp_path) -> Iterator[str]:
    """`dask scheduler` and two single-threaded `dask worker` processes on loopback; yields the address."""
    scheduler_file = tmp_path / "scheduler.json"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}  # workers report to this test's API
    logs = [(tmp_path / f"{name}.log").open("wb") for name in ("scheduler", "worker")]
    procs = [subprocess.Popen([str(DASK), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--scheduler-file", str(scheduler_file)],
                              env=env, stdout=logs[0], stderr=subprocess.STDOUT, start_new_session=True)]
    procs.append(subprocess.Popen([str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "2",
                                   "--nthreads", "1", "--no-dashboard", "--host", "127.0.0.1"],
                                  env=env, stdout=logs[1], stderr=subprocess.STDOUT, start_new_session=True))
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), (
                (tmp_path / "scheduler.log").read_text())
            time.sleep(0.2)
        yield json.loads(scheduler_file.read_text())["address"]
    finally:
        for proc in reversed(procs):
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for log in logs:
            log.close()


def test_cluster_started_with_the_dask_command_matches_and_caches(sequential, dask_cluster, tmp_path):
    check_same_and_cached(tmp_path / "store", "dask", sequential, dask_address=dask_cluster)
