"""Alerts on a real Prefect server: the project's automations applied from automations.yaml, the train deployment run
by a process worker, and a loopback HTTP receiver standing in for the chat webhook.

One server, one worker and two runs for the module: a quick run that quarantines a leaking batch and promotes its
model, then, while it holds the store, a run with a bad config that the deployment's concurrency limit holds back
until the first has finished, and that then fails.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import live_server
import numpy as np
import pytest
import yaml
from live_server import ROOT, api, deploy, process_worker, server_env
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.objects import FlowRun, State
from prefect.client.schemas.responses import SetStateStatus
from prefect.events.schemas.automations import EventTrigger, Posture
from prefect.states import Cancelled, Pending

from flows.automations import FILE, TAG, AutomationsError, build, read
from flows.cli import main as cli
from tasks.runs.registry import Registry

FLOW = "mnist-ae-pipeline"
POOL = "mnist-ae"
BLOCK = "mnist-ae-alerts"
JOB_ENV = ("MNIST_MIRROR", "MNIST_AE_STORE", "MNIST_AE_INCOMING", "MNIST_AE_DASK_ADDRESS")
BAD_CONFIG = {"pretrain.epochs": -1}
RUN_S = 300
QUIET_S = 5  # how long the receiver must stay quiet after the expected calls: no second copy of any


class Receiver(http.server.ThreadingHTTPServer):
    """An HTTP server on loopback that records every JSON body posted to it, with its arrival time."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                outer.calls.append({**body, "at": time.time()})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait_for(self, count: int, timeout: float) -> list[dict[str, Any]]:
        """The calls once there are `count` of them and none more came for QUIET_S seconds."""
        deadline = time.monotonic() + timeout
        while len(self.calls) < count and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(QUIET_S)
        return list(self.calls)


@contextlib.contextmanager
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Site:
    env: dict[str, str]
    url: str
    root: Path
    hooks: Receiver


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """A lasting Prefect server with its services, and the webhook receiver; the shell has none of the job env."""
    root = tmp_path_factory.mktemp("alerts")
    env = server_env(root / "prefect-home", MNIST_AE_OFFLINE="1",
                     # Short waits, so the test does not idle: a held-back run retries its slot, a worker polls.
                     PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS="2", PREFECT_WORKER_QUERY_SECONDS="1")
    for name in JOB_ENV:
        env.pop(name, None)
    with receiver() as hooks, live_server.prefect_server(env, root) as url:
        yield Site(env, url, root, hooks)


def apply(url: str) -> tuple[int, str]:
    out = io.StringIO()
    with api(url), contextlib.redirect_stdout(out):
        code = cli(["automations", "apply"])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def applied(site) -> list[str]:
    """The notification block the user creates once, then the automations applied twice; the second output."""
    with api(site.url):
        CustomWebhookNotificationBlock(name="mnist-ae", url=site.hooks.url,
                                       json_data={"subject": "{{subject}}", "body": "{{body}}"}).save(BLOCK)
    outputs = [apply(site.url) for _ in range(2)]
    assert [code for code, _ in outputs] == [0, 0], outputs
    return [text for _, text in outputs]


def leaking_batch(mnist, path: Path) -> None:
    """500 shifted training images the quick profile never trains on, one of them a test image."""
    x, y = np.roll(mnist.x_train[57000:57500], (1, -1), axis=(1, 2)), mnist.y_train[57000:57500].copy()
    x[17], y[17] = mnist.x_test[3], mnist.y_test[3]
    np.savez(path, x=x, y=y)


def wait_until(client: SyncPrefectClient, run_id: UUID, done: Any, timeout: float = RUN_S) -> FlowRun:
    deadline = time.monotonic() + timeout
    while not done(run := client.read_flow_run(run_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return run


@dataclass
class Runs:
    first: FlowRun
    second: FlowRun
    second_states: list[State]
    calls: list[dict[str, Any]]
    store: Path
    incoming: Path


@pytest.fixture(scope="module")
def runs(site, applied, mnist, mnist_mirror) -> Runs:
    store, incoming = site.root / "store", site.root / "incoming"
    incoming.mkdir()
    leaking_batch(mnist, incoming / "leak.npz")
    prefect_env = {**site.env}
    live_server.prefect(prefect_env, "work-pool", "create", POOL, "--type", "process")
    # The values a user changes in prefect.yaml: the runs get them from the deployment, not from the worker.
    deploy(prefect_env, site.root, MNIST_MIRROR=str(mnist_mirror), MNIST_AE_STORE=str(store),
           MNIST_AE_INCOMING=str(incoming))
    worker_dir = site.root / "worker"
    worker_dir.mkdir()
    with process_worker(site.env, POOL, worker_dir) as log, api(site.url) as client:
        train = client.read_deployment_by_name(f"{FLOW}/train")
        first = client.create_flow_run_from_deployment(train.id, parameters={"profile": "quick"})
        running = wait_until(client, first.id, lambda r: r.state.is_running() or r.state.is_final())
        assert running.state.is_running(), f"{running.state}\n{live_server.tail(log)}"
        second = client.create_flow_run_from_deployment(
            train.id, parameters={"profile": "quick", "overrides": BAD_CONFIG})
        ended = [wait_until(client, r.id, lambda r: r.state.is_final()) for r in (first, second)]
        assert all(r.state.is_final() for r in ended), f"{[r.state for r in ended]}\n{live_server.tail(log)}"
        calls = site.hooks.wait_for(3, timeout=60)
        return Runs(*ended, client.read_flow_run_states(second.id), calls, store, incoming)


def calls_about(runs: Runs, words: str) -> list[dict[str, Any]]:
    return [c for c in runs.calls if words in c["subject"]]


def test_applying_twice_leaves_one_copy_of_each(site, applied):
    _, entries = read(FILE)
    names = [e["name"] for e in entries]
    assert applied[1].startswith(f"{len(names)} automation(s) applied to {site.url} ({len(names)} earlier copies")
    with api(site.url) as client:
        automations = client.read_automations()
        block = client.read_block_document_by_name(BLOCK, "custom-webhook")
    assert sorted(a.name for a in automations) == sorted(names)
    assert all(TAG in a.tags for a in automations)
    for automation in automations:
        assert [getattr(a, "block_document_id", None) for a in automation.actions] == [block.id], automation.name


def test_a_failed_run_notifies_once_naming_the_run(runs):
    assert runs.second.state.is_failed(), runs.second.state
    (call,) = calls_about(runs, "mnist-ae: run ")
    assert call["subject"] == f"mnist-ae: run {runs.second.name} Failed"
    assert runs.second.name in call["body"] and "pretrain.epochs" in call["body"]


def test_a_promotion_notifies_once_naming_the_new_champion(runs):
    assert runs.first.state.is_completed(), runs.first.state
    champion = Registry(runs.store, "mnist").champion()
    assert champion is not None
    (call,) = calls_about(runs, "champion")
    assert call["subject"] == f"mnist-ae: new mnist champion {champion['key'][:12]}"
    assert f"New champion {champion['key']} (mnist), promoted by run {runs.first.name}" in call["body"]


def test_a_quarantined_batch_notifies_once_naming_the_file_and_the_failed_expectation(runs):
    (verdict_file,) = (runs.incoming / "_quarantine").glob("*/verdict.json")
    failures = json.loads(verdict_file.read_text())["failures"]
    assert failures
    (call,) = calls_about(runs, "quarantined")
    assert call["subject"] == "mnist-ae: batch leak.npz quarantined"
    assert all(failure in call["body"] for failure in failures), (failures, call["body"])
    assert len(runs.calls) == 3, [c["subject"] for c in runs.calls]  # nothing else, and no second copy


def test_a_second_run_waits_for_the_first_without_starting(runs):
    # ENQUEUE: the server refuses the second run's start while the first holds the deployment's one slot.
    names = [s.name for s in runs.second_states]
    assert "AwaitingConcurrencySlot" in names and names.index("AwaitingConcurrencySlot") < names.index("Running")
    assert runs.second.start_time is not None and runs.first.end_time is not None
    assert runs.second.start_time >= runs.first.end_time


def test_runs_take_their_environment_from_prefect_yaml(site, runs):
    assert not set(JOB_ENV) & set(site.env)  # the worker's shell has none of them
    assert runs.first.parameters == {"profile": "quick"}  # no store, no incoming directory among them
    assert Registry(runs.store, "mnist").champion() is not None
    assert [p.name for p in runs.incoming.iterdir()] == ["_quarantine"]


# --- the file itself, without a server ---


def test_the_automations_file_builds_and_names_what_prefect_yaml_deploys():
    notify, entries = read(FILE)
    block = uuid4()
    automations = build(FILE, entries, block)
    assert notify == f"custom-webhook/{BLOCK}"
    assert all(a.actions and all(getattr(x, "block_document_id", None) == block for x in a.actions)
               for a in automations)
    deployments = {d["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    (overdue,) = [a.trigger for a in automations if isinstance(a.trigger, EventTrigger)
                  and a.trigger.posture == Posture.Proactive]
    assert isinstance(overdue, EventTrigger)
    related = overdue.match_related if isinstance(overdue.match_related, list) else [overdue.match_related]
    named = {name for spec in related for name in spec.get("prefect.resource.name") or []}
    assert "retrain-weekly" in named and "retrain-weekly" in deployments
    assert 7 * 86400 < overdue.within.total_seconds() <= 8 * 86400


def test_apply_without_a_server_says_where_automations_live(monkeypatch, capsys):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert cli(["automations", "apply"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("mnist-ae: PREFECT_API_URL is not set: automations live on a lasting Prefect server")
    assert err.count("\n") == 1


def test_a_bad_automations_file_is_named(tmp_path):
    bad = tmp_path / "automations.yaml"
    bad.write_text("notify: custom-webhook/x\nautomations:\n  - name: broken\n    trigger: {type: event, "
                   "posture: Sideways}\n    actions: []\n")
    with pytest.raises(AutomationsError, match=rf"automations file {bad}, 'broken': trigger"):
        build(bad, read(bad)[1], uuid4())


def test_a_weekly_run_due_while_one_runs_is_cancelled(site, runs):
    # CANCEL_NEW, as the server decides it when a worker proposes to start a run (the worker has stopped).
    with api(site.url) as client:
        weekly = client.read_deployment_by_name(f"{FLOW}/retrain-weekly")
        first, second = (client.create_flow_run_from_deployment(weekly.id, parameters={"profile": "quick"})
                         for _ in range(2))
        try:
            assert client.set_flow_run_state(first.id, Pending()).status == SetStateStatus.ACCEPT
            refused = client.set_flow_run_state(second.id, Pending())
            assert (refused.status, refused.state.name) == (SetStateStatus.REJECT, "Cancelled"), refused
        finally:
            client.set_flow_run_state(first.id, Cancelled(), force=True)
