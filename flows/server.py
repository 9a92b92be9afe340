"""Prefect's API for a command-line run without `PREFECT_API_URL`: a temporary server, started before the heavy imports.

With no API URL, Prefect starts a temporary server at a run's first API call. That call first imports Prefect's
whole server application into the calling process (seconds of imports) and only then boots the server in a
subprocess, after this process has imported TensorFlow, Keras and Great Expectations. Instead, the command line
starts the same kind of server, `prefect server start` (API only: no UI, no background services, on loopback, with
Prefect's usual database), as soon as its arguments are checked. The server boots on the other core while this
process imports, and the run talks to it through `PREFECT_API_URL`, as to any Prefect server. It stops when the
process ends, however it ends, and a terminal's Ctrl-C reaches only the command, which stops the server itself.

Runs started at once share Prefect's database, which each new server migrates and fills with block types as it
starts, in steps that are not safe to run side by side in several processes: starts are taken in turn, under a file
lock beside the database, until the server answers.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

# Runs in the server's process before Prefect's command line, given this process's id. A server left behind by a
# run killed with SIGKILL keeps Prefect's database open and holds its memory, so Linux is asked to kill it when
# its parent ends (PR_SET_PDEATHSIG): the kernel does it, at any death of the parent, with no thread or pipe to
# watch. The signal comes when the thread that started the server ends: the command line starts it from its main
# thread, which lives as long as the process. SIGKILL, not SIGTERM: a server still migrating when the run dies
# would finish the migration first, beside the next run's server (the start lock died with the run); the
# database's transactions make a killed server harmless. Elsewhere than Linux the server outlives a killed run.
_SERVER = """
import ctypes, os, runpy, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent ended before the request took effect
        sys.exit(1)
runpy.run_module("prefect", run_name="__main__", alter_sys=True)
"""


class ServerError(RuntimeError):
    """The temporary Prefect server did not start."""


class TemporaryServer:
    """`prefect server start` in a subprocess for one command-line run; nothing starts if an API is configured."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self._starting: FileLock | None = None  # held from the start until the server answers
        self._output = tempfile.TemporaryFile()  # the server's own messages, quoted if it fails

    def start(self) -> TemporaryServer:
        """Start the server if a run would start a temporary one (no `PREFECT_API_URL`, temporary servers allowed)."""
        from prefect.logging import get_logger
        from prefect.logging.configuration import ensure_logging_setup
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

        if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
            return self
        with socket.socket() as sock:  # a port the system says is free
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/api"
        ensure_logging_setup()
        logger = get_logger("temporary_server")
        if (lock := _start_lock()) is not None:
            try:
                lock.acquire(blocking=False)
            except Timeout:
                # Another run holds it until its server answers or fails (its start-up timeout), or until it dies.
                logger.info("Waiting for another run's temporary server to finish starting on the same database")
                lock.acquire()
        self._starting = lock
        # A session of its own: a terminal's Ctrl-C goes to the command alone, which ends its flow run through
        # the server and then stops it, instead of a server gone at once under a flow still reporting to it.
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVER, str(os.getpid()), "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--no-ui", "--no-services", "--log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT, start_new_session=True)
        # No services: events reach it but no automation acts on them, so the line names where alerts work.
        logger.info("Starting temporary server on %s (it stops with this run and runs no automations; set "
                    "PREFECT_API_URL to use a lasting server)", self.url.removesuffix("/api"))
        atexit.register(self.stop)  # registered before Prefect's log and event flushes, so it runs after them
        return self

    @contextmanager
    def api(self) -> Iterator[None]:
        """Wait until the server answers, then point Prefect at it inside the block (a no-op when none started)."""
        if self.process is None:
            yield
            return
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            PREFECT_UI_URL,
            temporary_settings,
        )

        try:
            self._wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        except BaseException:
            self.stop()  # before the start lock is free, so no other server migrates beside this one
            raise
        self._release()
        # No UI URL: the server serves no UI and is gone after the run, so Prefect prints no "View at" link.
        with temporary_settings(updates={PREFECT_API_URL: self.url, PREFECT_UI_URL: ""}):
            yield

    def _wait(self, timeout: float) -> None:
        import httpx

        assert self.process is not None
        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerError(f"Prefect's temporary server exited with code {self.process.returncode} "
                                      f"before answering: {self._tail()}")
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise ServerError(f"Prefect's temporary server did not answer within {timeout:.0f} s "
                          f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): {self._tail()}")

    def _tail(self, lines: int = 5) -> str:
        self._output.seek(0)
        text = self._output.read().decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "it printed nothing"

    def _release(self) -> None:
        if self._starting is not None:
            self._starting.release()
            self._starting = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        self._release()


def _start_lock() -> FileLock | None:
    """The lock that takes servers' starts on Prefect's database in turn: beside a SQLite file, else in Prefect's home.

    None for an in-memory database (each server has its own) or a SQLite file in a missing directory (the server
    cannot open it and says so).
    """
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL, PREFECT_HOME

    url = str(PREFECT_API_DATABASE_CONNECTION_URL.value())
    if url.startswith("sqlite"):
        database = url.partition(":///")[2].partition("?")[0]
        if not database or ":memory:" in database or "mode=memory" in url:
            return None
        path = Path(database).absolute()
        if not path.parent.is_dir():
            return None
        lock = path.with_name(f"{path.name}.start.lock")
    else:  # one database server: the lock's name tells its URLs apart
        lock = Path(PREFECT_HOME.value()) / f"server-start-{hashlib.sha256(url.encode()).hexdigest()[:16]}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(lock, thread_local=False)
