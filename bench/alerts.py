"""Time from a project event to the webhook call its automation makes, on a real `prefect server` with its services.

Starts a server on loopback (a private Prefect home, SQLite), a webhook receiver, the notification block and the
project's automations (`mnist-ae automations apply`'s code), then emits `mnist-ae.batch.quarantined` events one
after the other, as a flow run does, and records when each one's notification arrives. The latency is the arrival
time minus the event's `occurred` time (both this machine's clock).

    python bench/alerts.py [--events 20] [--out bench/alerts.md]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.automations import apply

ARRIVED: dict[str, float] = {}


class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (the name http.server calls)
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        ARRIVED[body["body"].split("Moved to ", 1)[1].rstrip(".")] = time.time()
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/alerts.md"))
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="mnist-ae-alerts-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false"}
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        with temporary_settings(updates={PREFECT_API_URL: url}):
            latencies = measure(receiver, args.events)
    finally:
        receiver.shutdown()
        server.terminate()
        server.wait(timeout=30)
    report(args, latencies)


def measure(receiver: http.server.ThreadingHTTPServer, events: int) -> list[float]:
    """Apply the automations, emit the events one at a time, and return each one's latency in seconds, sorted."""
    CustomWebhookNotificationBlock(name="bench", url=f"http://127.0.0.1:{receiver.server_address[1]}/hook",
                                   json_data={"body": "{{body}}"}).save("mnist-ae-alerts")
    apply()
    time.sleep(5)  # the triggers service loads new automations on its own schedule
    occurred: dict[str, float] = {}
    for n in range(events):
        where = f"bench-{n}"
        event = emit_event("mnist-ae.batch.quarantined",
                           resource={"prefect.resource.id": f"mnist-ae.batch.{where}",
                                     "prefect.resource.name": f"{where}.npz"},
                           payload={"file": f"{where}.npz", "images": 1, "failed_expectations": ["bench"],
                                    "where": where})
        assert event is not None
        EventsWorker.drain_all()
        occurred[where] = event.occurred.timestamp()
        deadline = time.monotonic() + 60
        while where not in ARRIVED and time.monotonic() < deadline:
            time.sleep(0.02)
    return sorted(ARRIVED[w] - occurred[w] for w in occurred if w in ARRIVED)


def report(args: argparse.Namespace, latencies: list[float]) -> None:
    missing = args.events - len(latencies)
    lines = [
        f"# Event to webhook call ({datetime.now(UTC):%Y-%m-%d})", "",
        f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores; `prefect server` with its services on "
        f"SQLite, receiver on loopback; {args.events} `mnist-ae.batch.quarantined` events, one at a time; "
        f"seconds from the event's `occurred` to the receiver's arrival; load average {os.getloadavg()[0]:.1f} at "
        "the end (other work on the machine slows the server's services).", "",
        "| events | arrived | median s | fastest s | slowest s |", "| --- | --- | --- | --- | --- |",
        f"| {args.events} | {len(latencies)} | {statistics.median(latencies):.2f} | {latencies[0]:.2f} | "
        f"{latencies[-1]:.2f} |" if latencies else f"| {args.events} | 0 | - | - | - |",
    ]
    if missing:
        lines += ["", f"{missing} notification(s) did not arrive within 60 s."]
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
