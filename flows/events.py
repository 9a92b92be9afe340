"""The project's Prefect events: a model promoted or rejected, a batch accepted or quarantined, the study finished.

Each event names what it concerns (a model, a batch, a study report) as its resource and the dataset as a related
one; Prefect adds the flow run, flow and deployment that emitted it. Automations (automations.yaml) match on the
event names below; the payload holds the numbers a notification quotes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prefect.events import emit_event
from prefect.events.schemas.events import Event

from tasks.data.intake import Verdict
from tasks.runs.registry import Decision

PREFIX = "mnist-ae"
PROMOTED = f"{PREFIX}.model.promoted"
REJECTED = f"{PREFIX}.model.rejected"
ACCEPTED = f"{PREFIX}.batch.accepted"
QUARANTINED = f"{PREFIX}.batch.quarantined"
STUDY_FINISHED = f"{PREFIX}.study.finished"


def _resource(kind: str, ident: str, name: str, role: str | None = None) -> dict[str, str]:
    labels = {"prefect.resource.id": f"{PREFIX}.{kind}.{ident}", "prefect.resource.name": name}
    return {**labels, "prefect.resource.role": role} if role else labels


def _dataset(dataset: str) -> dict[str, str]:
    return _resource("dataset", dataset, dataset, role="dataset")


def _model(key: str, role: str | None = None) -> dict[str, str]:
    return _resource("model", key, key[:12], role)


def model_judged(dataset: str, decision: Decision, challenger: dict[str, Any],
                 champion: dict[str, Any] | None) -> Event | None:
    """`mnist-ae.model.promoted` or `.rejected` for a challenger judged against `champion` (the one before)."""
    related = [_dataset(dataset)] + ([_model(champion["key"], role="champion")] if champion else [])
    payload = {"dataset": dataset, "challenger": challenger["key"], "champion": champion and champion["key"],
               "challenger_accuracy": decision.challenger_accuracy, "champion_accuracy": decision.champion_accuracy,
               "baseline_accuracy": decision.baseline_accuracy, "p_value": decision.p_value, "reason": decision.reason}
    if decision.promote:
        payload |= {"new_champion": challenger["key"], "old_champion": champion and champion["key"]}
    return emit_event(PROMOTED if decision.promote else REJECTED, resource=_model(challenger["key"]),
                      related=related, payload=payload)


def batches_judged(dataset: str, verdicts: Iterable[Verdict]) -> list[Event | None]:
    """One `mnist-ae.batch.accepted` or `.quarantined` per batch judged in this run."""
    return [emit_event(ACCEPTED if v.accepted else QUARANTINED,
                       resource=_resource("batch", v.sha256 or v.name, v.name), related=[_dataset(dataset)],
                       payload={"dataset": dataset, "file": v.name, "images": v.images, "sha256": v.sha256,
                                "failed_expectations": list(v.failures), "where": v.where})
            for v in verdicts]


def study_finished(dataset: str, profile: str, key: str, report: str, verdicts: list[str]) -> Event | None:
    """`mnist-ae.study.finished` with one verdict sentence per label budget and the report's path."""
    return emit_event(STUDY_FINISHED, resource=_resource("study", key, f"label study {key[:12]}"),
                      related=[_dataset(dataset)],
                      payload={"dataset": dataset, "profile": profile, "report": report, "verdicts": verdicts})
