"""Prefect's API for a command-line run without `PREFECT_API_URL`: a temporary server, started before the heavy imports.

With no API URL, Prefect starts a temporary server at a run's first API call. That call first imports Prefect's
whole server application into the calling process (about 5 s on two cores) and only then boots the server in a
subprocess, after this process has imported TensorFlow, Keras and Great Expectations. Instead, the command line
starts the same kind of server, `prefect server start` (API only: no UI, no background services, on loopback, with
Prefect's usual database), as soon as its arguments are checked. The server boots on the other core while this
process imports, and the run talks to it through `PREFECT_API_URL`, as to any Prefect server. It stops when the
process ends.
"""

from __future__ import annotations

import atexit
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager


class ServerError(RuntimeError):
    """The temporary Prefect server did not start."""


class TemporaryServer:
    """`prefect server start` in a subprocess for one command-line run; nothing starts if an API is configured."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
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
        self.process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
             "--no-ui", "--no-services", "--log-level", "error"],
            stdin=subprocess.DEVNULL, stdout=self._output, stderr=subprocess.STDOUT)
        ensure_logging_setup()
        get_logger("temporary_server").info("Starting temporary server on %s (it stops with this run; set "
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

        self._wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
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

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
