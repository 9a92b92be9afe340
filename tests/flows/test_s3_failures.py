"""A store on S3 when things go wrong: the server goes away mid-run, a run is killed holding a lock, half an upload."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

from flows.cli import main as cli
from tasks.config import load_config
from tasks.pipeline import graph
from tasks.store import objects
from tasks.store.artifacts import Store


def test_a_server_gone_mid_run_ends_it_with_one_line(own_s3_server, tmp_path, mnist_mirror, monkeypatch):
    """The S3 server dies once the run has stored its first stage; the run names the store it cannot reach."""
    server, aws, bucket = own_s3_server
    url = f"s3://{bucket}/gone"
    for name, value in aws.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, "MNIST_MIRROR": str(mnist_mirror), "MNIST_AE_OFFLINE": "1",
           "MNIST_AE_CACHE": str(tmp_path / "cache"), "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--profile", "quick", "--store", url,
                            "--only", "download,validate,pretrain"],
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = Store(url)
        deadline = time.monotonic() + 300
        while not store.manifests("download") and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        server.kill()
        _, err = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mnist-ae: store {url} cannot be reached (Could not connect to the endpoint URL: ")
    assert last.endswith("; check that its S3 server is running and that AWS_ENDPOINT_URL names it"), last
    assert "Exception in thread" not in err  # the lease's renewer reports a failed renewal, it does not crash


def _hold_and_wait(url: str, ready: str) -> None:
    with Store(url).lock("registry-mnist"):
        Path(ready).touch()
        time.sleep(600)


def test_a_run_waiting_for_a_killed_runs_lock_says_so_before_waiting(s3_server, tmp_path, monkeypatch, caplog,
                                                                     capsys):
    url = f"s3://{s3_server}/{uuid.uuid4().hex[:12]}"
    ready = tmp_path / "ready"
    holder = multiprocessing.get_context("spawn").Process(target=_hold_and_wait, args=(url, str(ready)))
    holder.start()
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(holder.pid, signal.SIGKILL)  # as `kill -9` of a run: its lease stays behind
    holder.join()
    monkeypatch.setattr(objects, "LEASE_S", 2.0)
    with caplog.at_level(logging.INFO, logger="tasks.store.objects"):
        assert cli(["rollback", "--store", url]) == 1  # an empty registry: nothing to roll back, once it has the lock
    waiting, took_over = (r.getMessage() for r in caplog.records if r.name == "tasks.store.objects")
    assert waiting.startswith(f"lock {url}/.locks/registry-mnist.lock is held by {socket.gethostname()}:{holder.pid}:")
    assert waiting.endswith("; waiting until it is released, or for up to 2 s without renewal if its holder died "
                            "(then taking it over)")
    assert took_over.startswith(f"lock {url}/.locks/registry-mnist.lock: took over a lease not renewed for 2 s")
    assert "no champion to roll back from" in capsys.readouterr().err


def test_status_calls_an_artifact_uploaded_without_its_manifest_incomplete(s3_server, capsys):
    url = f"s3://{s3_server}/{uuid.uuid4().hex[:12]}"
    store = Store(url)
    assert store.bucket is not None
    download = graph.plan(load_config("quick", store=url), store)[0]
    store.bucket.put(f"download/{download.key}/data.npz", b"the first bytes of a killed upload")
    assert cli(["status", "--profile", "quick", "--store", url]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("  download"))
    assert line.endswith("not cached (stored artifact is incomplete: files without a manifest: a run writing it "
                         "stopped before committing it, or is writing it now; the next run recomputes it)")
