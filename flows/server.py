"""Prefect's temporary server for a command-line run, started before the heavy imports instead of after them.

With no `PREFECT_API_URL`, Prefect starts a temporary API server (a uvicorn subprocess) on a run's first API call,
which comes after TensorFlow, Keras and Great Expectations are imported; the two start-ups then take turns. This
starts the same server (Prefect's `SubprocessASGIServer`, which Prefect's client finds and reuses) from a
background thread first, so that it boots in its own process while this one imports.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def start_temporary_server() -> Callable[[], None]:
    """Start Prefect's temporary server now if a run would start one; return a wait for it to answer.

    The wait raises the start-up's error. Nothing starts when an API is configured (`PREFECT_API_URL`) or
    temporary servers are turned off (`PREFECT_SERVER_ALLOW_EPHEMERAL_MODE=false`); the wait then returns at once.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_ALLOW_EPHEMERAL_MODE

    if PREFECT_API_URL.value() or not PREFECT_SERVER_ALLOW_EPHEMERAL_MODE.value():
        return lambda: None
    # Imported here, on this thread: importing on two threads at once can see half-initialised modules.
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.server.api.server import SubprocessASGIServer

    ensure_logging_setup()  # Prefect's own line saying where the server runs, as when Prefect starts it

    failed: list[BaseException] = []

    def start() -> None:
        try:
            SubprocessASGIServer().start()  # waits until the server answers its health check
        except BaseException as exc:  # handed to the waiting thread
            failed.append(exc)

    thread = threading.Thread(target=start, name="prefect-temporary-server", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]

    return wait
