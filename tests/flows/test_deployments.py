"""prefect.yaml: its deployments as Prefect reads them, then a real server, worker and two deployment runs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import live_server
import pytest
import yaml
from live_server import ROOT, api, deploy, prefect, server_env
from prefect.cli.deploy._config import _load_deploy_configs_and_actions
from prefect.cli.deploy._models import DeploymentConfig, PrefectYamlModel, RawScheduleConfig, WorkPoolConfig
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterKey,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, FlowRun
from prefect.exceptions import ParameterTypeError, SignatureMismatchError
from prefect.flows import Flow, load_flow_from_entrypoint
from prefect.server.schemas.schedules import CronSchedule
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools import ValidationError, validate
from rich.console import Console

from tasks.config import check_study, load_config

PREFECT_YAML = ROOT / "prefect.yaml"
FLOW_NAME = "mnist-ae-pipeline"
POOL = "mnist-ae"
DEPLOYMENTS = ("train", "retrain-weekly")
STUDY_FLOW = "label-study"
STUDY_DEPLOYMENT = "label-study"
WEEKLY_CRON = "0 3 * * 1"
WEEKLY_TZ = "Europe/Berlin"
BERLIN = ZoneInfo(WEEKLY_TZ)
MONDAY = 0
RUN_S = 300


def load_deployments() -> dict[str, dict[str, Any]]:
    """The deployment configs of prefect.yaml as `prefect deploy` loads them, by name."""
    configs, _ = _load_deploy_configs_and_actions(PREFECT_YAML, console=Console(stderr=True))
    return {c["name"]: c for c in configs}


def load_pipeline(entrypoint: str) -> Flow[..., Any]:
    """The flow an entrypoint names, loaded the way a worker loads it (relative to the repository root)."""
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        return load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    finally:
        os.chdir(cwd)


def check_parameters(flow: Flow[..., Any], parameters: dict[str, Any]) -> None:
    """Raise unless the server (JSON schema) and the flow (its signature) both accept the parameters."""
    validate(parameters, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)
    flow.validate_parameters(parameters)


def test_prefect_yaml_uses_only_fields_prefect_reads():
    # Prefect's models ignore unknown keys, so a misspelt field would silently do nothing.
    raw = yaml.safe_load(PREFECT_YAML.read_text())
    top = {f.alias or name for name, f in PrefectYamlModel.model_fields.items()}
    assert set(raw) <= top, set(raw) - top
    for dep in raw["deployments"]:
        assert set(dep) <= set(DeploymentConfig.model_fields), set(dep) - set(DeploymentConfig.model_fields)
        assert set(dep["work_pool"]) <= set(WorkPoolConfig.model_fields)
        for schedule in dep.get("schedules") or []:
            RawScheduleConfig.model_validate(schedule)
    assert sorted(load_deployments()) == sorted((*DEPLOYMENTS, STUDY_DEPLOYMENT))


JOB_ENV = {"MNIST_MIRROR", "MNIST_AE_STORE", "MNIST_AE_INCOMING", "MNIST_AE_DASK_ADDRESS"}


def test_deployments_declare_their_environment_and_run_one_at_a_time():
    strategies = {}
    for name, deployment in load_deployments().items():
        # Empty values: a run sees these unset, whatever the worker's shell holds.
        assert deployment["work_pool"]["job_variables"]["env"] == dict.fromkeys(JOB_ENV, ""), name
        limit = ConcurrencyLimitConfig.model_validate(deployment["concurrency_limit"])
        assert limit.limit == 1, name
        strategies[name] = limit.collision_strategy
    assert strategies == {"train": ConcurrencyLimitStrategy.ENQUEUE, "label-study": ConcurrencyLimitStrategy.ENQUEUE,
                          "retrain-weekly": ConcurrencyLimitStrategy.CANCEL_NEW}


def test_weekly_schedule_fires_mondays_at_three_berlin_time():
    weekly = load_deployments()["retrain-weekly"]
    assert weekly["work_pool"]["name"] == POOL
    (config,) = weekly["schedules"]
    # The conversion `prefect deploy` applies to a schedule entry before sending it to the server.
    client_schedule = _schedule_config_to_deployment_schedule(config)["schedule"]
    assert (client_schedule.cron, client_schedule.timezone) == (WEEKLY_CRON, WEEKLY_TZ)
    # The server's schedule type is what the scheduler service uses to create the runs.
    schedule = CronSchedule.model_validate(client_schedule.model_dump())
    # Ten Mondays across the switch to summer time on 2026-03-29.
    dates = asyncio.run(schedule.get_dates(n=10, start=datetime(2026, 3, 1, tzinfo=BERLIN)))
    local = [d.astimezone(BERLIN) for d in dates]
    assert all((d.weekday(), d.hour, d.minute) == (MONDAY, 3, 0) for d in local), local
    assert local[0].date().isoformat() == "2026-03-02"
    assert [d.astimezone(ZoneInfo("UTC")).hour for d in dates] == [2] * 4 + [1] * 6


def test_train_deployment_is_on_demand():
    train = load_deployments()["train"]
    assert train["schedules"] == []
    assert train["work_pool"]["name"] == POOL


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_deployment_runs_the_pipeline_with_valid_parameters(name):
    deployment = load_deployments()[name]
    flow = load_pipeline(deployment["entrypoint"])
    assert flow.name == FLOW_NAME
    assert Path(flow.fn.__code__.co_filename).resolve() == ROOT / "flows" / "pipeline.py"
    parameters = deployment["parameters"]
    check_parameters(flow, parameters)
    # The flow itself refuses stages that are not part of the profile; check that before a run does.
    config = load_config(parameters.get("profile", "default"), parameters.get("overrides") or {})
    assert set(parameters.get("force") or []) | set(parameters.get("stages") or []) <= set(config.stages)


def test_study_deployment_runs_the_label_study_with_valid_parameters():
    deployment = load_deployments()[STUDY_DEPLOYMENT]
    assert deployment["schedules"] == [] and deployment["work_pool"]["name"] == POOL
    flow = load_pipeline(deployment["entrypoint"])
    assert flow.name == STUDY_FLOW
    assert Path(flow.fn.__code__.co_filename).resolve() == ROOT / "flows" / "study.py"
    parameters = deployment["parameters"]
    check_parameters(flow, parameters)
    check_study(load_config(parameters.get("profile", "default"), parameters.get("overrides") or {}))


@pytest.mark.parametrize("bad", [{"force": ["downlaod"]}, {"stages": "download"}, {"profile": ["quick"]}])
def test_parameter_checks_reject_what_a_run_would_reject(bad):
    flow = load_pipeline(load_deployments()["train"]["entrypoint"])
    parameters = {"profile": "quick", **bad}
    with pytest.raises(ValidationError):
        validate(parameters, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=True)
    with pytest.raises(ParameterTypeError):
        flow.validate_parameters(parameters)


def test_parameter_check_rejects_an_unknown_parameter():
    # The server's schema lets unknown names through; the flow's signature check is what catches them.
    flow = load_pipeline(load_deployments()["train"]["entrypoint"])
    with pytest.raises(SignatureMismatchError, match="proflie"):
        check_parameters(flow, {"proflie": "quick"})


# --- end to end: prefect server, prefect deploy, a process worker, two runs of the train deployment ---


@pytest.fixture
def prefect_env(tmp_path) -> dict[str, str]:
    """Environment for every child process: a private Prefect home and server, no MNIST mirror (see deploy)."""
    env = server_env(tmp_path / "prefect-home", MNIST_AE_OFFLINE="1")
    env.pop("MNIST_MIRROR", None)
    return env


@pytest.fixture
def prefect_server(prefect_env, tmp_path) -> Iterator[str]:
    """A `prefect server start` on SQLite in the private home; yields its API URL and always stops it."""
    with live_server.prefect_server(prefect_env, tmp_path) as url:
        yield url


def run_train(env: dict[str, str], store: Path, worker_dir: Path, runner: str) -> tuple[UUID, str]:
    """Trigger the train deployment with the quick profile, let a worker run it; return the run id and worker log."""
    out = prefect(env, "deployment", "run", f"{FLOW_NAME}/train", "--param", "profile=quick",
                  "--param", f"store={json.dumps(str(store))}", "--param", f"runner={runner}")
    match = re.search(r"UUID: ([0-9a-f-]{36})", out)
    assert match, out
    # Started elsewhere than the repository: the deployment's pull step must find the code on its own.
    log = prefect(env, "worker", "start", "--pool", POOL, "--run-once", cwd=worker_dir, timeout=RUN_S)
    return UUID(match.group(1)), log


def stage_states(client: SyncPrefectClient, flow_run_id: UUID) -> dict[str, str]:
    """State name of each pipeline stage's task run (task runs are named `<stage>-<key prefix>`)."""
    runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    stages = set(load_config("quick").stages)
    states = {r.name.rsplit("-", 1)[0]: r.state.name for r in runs if r.name.rsplit("-", 1)[0] in stages}
    return states


def scheduled_runs(client: SyncPrefectClient, deployment_id: UUID, timeout: float = 30) -> list[FlowRun]:
    """The deployment's Scheduled flow runs, waiting for the server's scheduler loop to create the first ones."""
    deadline = time.monotonic() + timeout
    while True:
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Scheduled"]))),
        )
        if runs or time.monotonic() > deadline:
            assert runs, f"no scheduled runs after {timeout}s"
            return runs
        time.sleep(1)


def read_champion(store: Path) -> dict[str, Any] | None:
    return json.loads((store / "registry" / "mnist.json").read_text())["champion"]


def read_run_log(store: Path) -> list[dict[str, Any]]:
    path = store / "run_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_deployment_runs_on_a_worker_and_reuses_the_store(prefect_server, prefect_env, tmp_path, mnist_mirror):
    env, url, store = prefect_env, prefect_server, tmp_path / "store"
    worker_dir = tmp_path / "worker"
    worker_dir.mkdir()
    prefect(env, "work-pool", "create", POOL, "--type", "process")
    # The mirror reaches the runs through prefect.yaml's job environment; the worker's has none.
    deploy(env, tmp_path, MNIST_MIRROR=str(mnist_mirror))

    with api(url) as client:
        weekly = client.read_deployment_by_name(f"{FLOW_NAME}/retrain-weekly")
        assert weekly.parameters == load_deployments()["retrain-weekly"]["parameters"]
        (schedule,) = weekly.schedules
        assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == (WEEKLY_CRON, WEEKLY_TZ, True)
        # The server plans the next weekly runs as soon as the deployment exists.
        planned = scheduled_runs(client, weekly.id)
        starts = [r.expected_start_time.astimezone(BERLIN) for r in planned]
        assert all((s.weekday(), s.hour, s.minute) == (MONDAY, 3, 0) for s in starts), starts
        assert not client.read_deployment_by_name(f"{FLOW_NAME}/train").schedules

    # A LocalCluster started inside the worker's flow-run process (Prefect's tracker has reports of "daemonic
    # processes are not allowed to have children" there).
    first, log = run_train(env, store, worker_dir, "dask")
    with api(url) as client:
        run = client.read_flow_run(first)
        assert run.state.is_completed(), f"{run.state}\n{log[-6000:]}"
        assert run.parameters == {"profile": "quick", "store": str(store), "runner": "dask"}
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mnist-ae-report", "mnist-ae-accuracy"])),
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first])),
        )
        assert {(a.key, a.type) for a in artifacts} == {("mnist-ae-report", "markdown"), ("mnist-ae-accuracy", "table")}
        first_states = stage_states(client, first)
    assert sorted(first_states) == sorted(load_config("quick").stages)
    assert set(first_states.values()) == {"Completed"}, first_states
    champion = read_champion(store)
    assert champion is not None
    (record,) = read_run_log(store)
    assert record["flow_run_id"] == str(first)

    second, log = run_train(env, store, worker_dir, "sequential")
    with api(url) as client:
        state = client.read_flow_run(second).state
        assert state.is_completed(), f"{state}\n{log[-6000:]}"
        second_states = stage_states(client, second)
    assert sorted(second_states) == sorted(first_states)
    # Whatever the runner, the store decides. A stage's key covers its source, so editing tasks/ while this test
    # runs also fails here.
    assert set(second_states.values()) == {"Cached"}, f"recomputed on the second run: {second_states}"
    assert [r["flow_run_id"] for r in read_run_log(store)] == [str(first), str(second)]
    assert read_champion(store)["key"] == champion["key"]
