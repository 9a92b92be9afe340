"""The project's events as Prefect's events client receives them: names, resources and payload numbers.

The webhook test (test_alerts.py) follows a promotion and a quarantine through a real server; these are every event,
the rejected model, the accepted batch and the finished study included, at the client.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from live_server import free_port
from prefect.events.clients import AssertingEventsClient
from prefect.events.schemas.events import Event
from prefect.events.worker import EventsWorker
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows import events
from tasks.data.intake import Verdict
from tasks.runs.registry import Decision

OLD, NEW = "a" * 64, "b" * 64


@pytest.fixture
def emitted(monkeypatch) -> Iterator[EventsWorker]:
    """The events worker, sending to Prefect's asserting client, which keeps what it is sent.

    Outside a run nothing is read from an API, but without an API URL the worker's own client would start a
    temporary server first; one at a closed port costs nothing.
    """
    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        worker = EventsWorker.instance(AssertingEventsClient)
        monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
        yield worker
        worker.drain()


def sent(worker: EventsWorker) -> list[Event]:
    worker.drain()
    assert isinstance(worker._client, AssertingEventsClient)
    return list(worker._client.events)


def related(event: Event) -> dict[str, str]:
    return {r.id: r.role for r in event.related}


def test_a_promotion_names_both_champions_and_the_numbers(emitted):
    decision = Decision(True, "challenger 97.00% vs champion 96.00% (+1.00 pts), McNemar exact p=0.01 < 0.05: "
                        "promoted", 0.96, 0.97, 10, 30, 0.01, 0.92)
    events.model_judged("mnist", decision, {"key": NEW}, {"key": OLD})
    (event,) = sent(emitted)
    assert event.event == "mnist-ae.model.promoted"
    assert (event.resource.id, event.resource.name) == (f"mnist-ae.model.{NEW}", NEW[:12])
    assert related(event) == {"mnist-ae.dataset.mnist": "dataset", f"mnist-ae.model.{OLD}": "champion"}
    assert event.payload == {"dataset": "mnist", "challenger": NEW, "champion": OLD, "new_champion": NEW,
                             "old_champion": OLD, "challenger_accuracy": 0.97, "champion_accuracy": 0.96,
                             "baseline_accuracy": 0.92, "p_value": 0.01, "reason": decision.reason}


def test_a_first_model_has_no_old_champion_and_a_rejection_says_why(emitted):
    first = Decision(True, "first model: becomes champion", None, 0.9, None, None, None, 0.8)
    rejected = Decision(False, "challenger 80.00% does not beat its run's softmax baseline 81.00%: not promoted",
                        None, 0.8, None, None, None, 0.81)
    events.model_judged("fashion-mnist", first, {"key": OLD}, None)
    events.model_judged("fashion-mnist", rejected, {"key": NEW}, {"key": OLD})
    promoted, refused = sent(emitted)
    assert promoted.payload["old_champion"] is None and promoted.payload["new_champion"] == OLD
    assert related(promoted) == {"mnist-ae.dataset.fashion-mnist": "dataset"}
    assert refused.event == "mnist-ae.model.rejected" and "new_champion" not in refused.payload
    assert refused.payload["reason"] == rejected.reason and refused.resource.id == f"mnist-ae.model.{NEW}"


def test_each_judged_batch_is_one_event_naming_its_file(emitted):
    verdicts = [Verdict("week-48.npz", "c" * 64, 500, True, (), "batches/cccc"),
                Verdict("leak", "d" * 64, 500, False, ("no image duplicates a test image (...): 1 image(s)",),
                        "incoming/_quarantine/leak"),
                Verdict("cut.npz", None, 0, False, ("cut.npz: not a readable .npz",), "incoming/_quarantine/cut")]
    events.batches_judged("mnist", verdicts)
    accepted, leak, cut = sent(emitted)
    assert [e.event for e in (accepted, leak, cut)] == ["mnist-ae.batch.accepted"] + ["mnist-ae.batch.quarantined"] * 2
    assert (accepted.resource.id, accepted.resource.name) == (f"mnist-ae.batch.{'c' * 64}", "week-48.npz")
    assert leak.payload["failed_expectations"] == list(verdicts[1].failures) and leak.payload["file"] == "leak"
    assert cut.resource.id == "mnist-ae.batch.cut.npz"  # unreadable: no content hash, named by its file


def test_the_finished_study_carries_its_verdicts(emitted):
    verdicts = ["With 100 labels pretraining helps: +2.2 points", "With 1,000 labels: no difference"]
    events.study_finished("mnist", "default", "e" * 64, "study-report/eeee/report.html", verdicts)
    (event,) = sent(emitted)
    assert event.event == "mnist-ae.study.finished" and event.resource.id == f"mnist-ae.study.{'e' * 64}"
    assert event.payload == {"dataset": "mnist", "profile": "default", "report": "study-report/eeee/report.html",
                             "verdicts": verdicts}
