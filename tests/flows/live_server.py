"""A real `prefect server start`, `prefect` commands and a process worker, for the tests of deployments and alerts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import yaml
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.settings import PREFECT_API_URL, temporary_settings

ROOT = Path(__file__).resolve().parents[2]
PREFECT = Path(sys.executable).with_name("prefect")
SERVER_START_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop(proc: subprocess.Popen[Any]) -> None:
    """End a process group started with start_new_session: SIGTERM, then SIGKILL whatever outlives a grace period."""
    for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + grace
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader: as a zombie it would keep the group alive
                os.killpg(proc.pid, 0)
                time.sleep(0.2)
        except ProcessLookupError:
            return


def server_env(home: Path, **extra: str) -> dict[str, str]:
    """Environment for every child process: a private Prefect home and the API URL of a server on a free port."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{free_port()}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        **extra,
    )
    return env


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextmanager
def prefect_server(env: dict[str, str], workdir: Path, *options: str) -> Iterator[str]:
    """A `prefect server start` (SQLite in the private home) at env's API URL; yields the URL and always stops it."""
    log = workdir / "server.log"
    url = env["PREFECT_API_URL"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(urlsplit(url).port), *options],
            cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_START_S
        while not healthy(url):
            assert proc.poll() is None, f"prefect server exited with {proc.returncode}:\n{tail(log)}"
            assert time.monotonic() < deadline, f"prefect server not healthy after {SERVER_START_S}s:\n{tail(log)}"
            time.sleep(0.5)
        yield url
    finally:
        stop(proc)


@contextmanager
def process_worker(env: dict[str, str], pool: str, workdir: Path) -> Iterator[Path]:
    """A `prefect worker start` polling `pool` until the block ends; yields its log file."""
    log = workdir / "worker.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(PREFECT), "worker", "start", "--pool", pool], cwd=workdir, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield log
    finally:
        stop(proc)


def prefect(env: dict[str, str], *args: str, cwd: Path = ROOT, timeout: float = 120) -> str:
    """Run a `prefect` command to completion in its own process group and return its output; fail on error."""
    proc = subprocess.Popen([str(PREFECT), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        output, _ = proc.communicate()
        pytest.fail(f"prefect {' '.join(args)} did not finish in {timeout}s:\n{output[-4000:]}")
    finally:
        stop(proc)
    assert proc.returncode == 0, f"prefect {' '.join(args)} exited with {proc.returncode}:\n{output[-4000:]}"
    return output


@contextmanager
def api(url: str) -> Iterator[SyncPrefectClient]:
    with temporary_settings(updates={PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        yield client


def deploy(env: dict[str, str], workdir: Path, **job_env: str) -> None:
    """`prefect deploy --all` from the repository, with prefect.yaml's job environment values set as a user sets them
    (the values marked CHANGE), so the runs do not depend on the worker's environment."""
    document = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in document["deployments"]:
        declared = deployment["work_pool"]["job_variables"]["env"]
        assert set(job_env) <= set(declared), f"not declared in prefect.yaml: {set(job_env) - set(declared)}"
        deployment["work_pool"]["job_variables"]["env"] = {**declared, **job_env}
    edited = workdir / "prefect.yaml"
    edited.write_text(yaml.safe_dump(document, sort_keys=False))
    prefect(env, "--no-prompt", "deploy", "--all", "--prefect-file", str(edited))
