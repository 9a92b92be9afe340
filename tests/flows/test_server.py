"""The temporary Prefect server of a command-line run: concurrent first starts, a killed run, Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest

from tasks.store.artifacts import verify

T = TypeVar("T")


def _env(tmp_path: Path, mnist_mirror: Path) -> dict[str, str]:
    """A first run on this machine: a new Prefect home, no API URL, no database of the user's."""
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "PREFECT_HOME": str(tmp_path / "prefect-home")}
    for name in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL"):
        env.pop(name, None)
    return env


def _run(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--profile", "quick", "--store", str(store), *args]


def _wait_for(what: Callable[[], T | None], run: subprocess.Popen[str], log: Path, timeout: float = 300) -> T:
    """Poll `what` until it returns a value, while the run goes on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (found := what()) is not None:
            return found
        assert run.poll() is None, f"the run ended with {run.returncode}: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    pytest.fail(f"gave up waiting after {timeout:.0f} s: {log.read_text()[-3000:]}")


def _started_server(run: subprocess.Popen[str], log: Path) -> psutil.Process:
    """The run's temporary server, once it answers."""
    url = _wait_for(lambda: (m := re.search(r"Starting temporary server on (\S+)", log.read_text())) and m[1],
                    run, log)
    server = _wait_for(lambda: next((c for c in psutil.Process(run.pid).children()
                                     if "server" in c.cmdline() and "start" in c.cmdline()), None), run, log)

    def answers() -> bool | None:
        try:
            return httpx.get(f"{url}/api/health").status_code == 200 or None
        except httpx.TransportError:
            return None

    _wait_for(answers, run, log)
    return server


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # dead, not yet reaped by its new parent
    except psutil.NoSuchProcess:
        return True


def _wait_gone(process: psutil.Process, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not _gone(process) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _gone(process)


@pytest.mark.parametrize("attempt", range(3))
def test_three_first_runs_started_together_all_finish(attempt, tmp_path, mnist_mirror):
    """Each run's server migrates the same new Prefect database as it starts; the starts must not collide."""
    store = tmp_path / "store"
    procs = [subprocess.Popen(_run(store, "--only", "download"), env=_env(tmp_path, mnist_mirror),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(3)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-3000:] for o in outputs)
    assert [o.count("Starting temporary server") for o in outputs] == [1, 1, 1]
    [artifact] = (store / "download").iterdir()
    assert verify(artifact, artifact.name) is None


def test_a_killed_run_takes_its_temporary_server_with_it(tmp_path, mnist_mirror):
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:
        run = subprocess.Popen(_run(tmp_path / "store", "--only", "download"), env=_env(tmp_path, mnist_mirror),
                               stdout=subprocess.DEVNULL, stderr=err, text=True)
    try:
        server = _started_server(run, log)
    finally:
        run.kill()
    run.wait(timeout=10)
    try:
        assert _wait_gone(server, timeout=10), f"server {server.pid} outlived its run: {server.cmdline()}"
    finally:
        if not _gone(server):
            server.kill()


def test_ctrl_c_during_pretraining_stops_within_seconds_and_keeps_only_finished_stages(tmp_path, mnist_mirror):
    """As in a terminal: SIGINT to the command's process group while a stage trains."""
    store, log = tmp_path / "store", tmp_path / "stderr.txt"
    # Enough epochs that pretraining is still running long after the interrupt, were it ignored.
    cmd = _run(store, "--only", "download,validate,pretrain", "--set", "pretrain.epochs=500",
               "--set", "pretrain.early_stopping_patience=500")
    with log.open("w") as err:
        run = subprocess.Popen(cmd, env=_env(tmp_path, mnist_mirror), stdout=subprocess.PIPE, stderr=err, text=True,
                               start_new_session=True)
    try:
        server = _started_server(run, log)
        _wait_for(lambda: "autoencoder epoch 2/" in log.read_text() or None, run, log)
        os.killpg(run.pid, signal.SIGINT)
        out, _ = run.communicate(timeout=30)
    finally:
        run.kill()
    stderr = log.read_text()
    assert run.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert "mnist-ae: interrupted; finished stages stay in the store" in stderr
    assert "store:" not in out  # no summary of a run that did not finish
    assert _wait_gone(server, timeout=10)
    for stage in ("download", "validate"):
        [artifact] = (store / stage).iterdir()
        assert verify(artifact, artifact.name) is None
    assert not (store / "pretrain").exists() or not any((store / "pretrain").iterdir())
