"""Admitting incoming batches: each new one is validated against the data it would join, then accepted or quarantined.

Runs before the stages' keys are planned, so the data artifact's key covers exactly the accepted batches and a
quarantined batch never reaches training. An accepted batch's verdict (its Great Expectations results and Data
Docs) is kept in the store as `batches/<content hash>/`, so later runs take it as accepted without validating it
again; a refused batch is moved, with its validation report, into `_quarantine/` of the incoming directory.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from tasks import document
from tasks.config import DataConfig, PipelineConfig, SplitSpec
from tasks.data.batches import Batch, load_accepted, scan
from tasks.data.checks import Reference, ValidationFailed, reference, validate_batch
from tasks.data.idx import DataError
from tasks.data.sources import fetch
from tasks.data.splits import training_images
from tasks.store.artifacts import Store

log = logging.getLogger(__name__)

VERDICTS = "batches"  # store directory: one artifact per accepted batch, named by its content hash
QUARANTINE = "_quarantine"
VERDICT_FILE = "verdict.json"


@dataclass(frozen=True)
class Verdict:
    """Whether one batch joins the training data, and why not."""

    name: str
    sha256: str | None
    images: int
    accepted: bool
    failures: tuple[str, ...] = ()
    where: str = ""  # the verdict's artifact in the store, or the batch's quarantine directory


@dataclass(frozen=True)
class Intake:
    """The accepted batches the training data includes, and what this run decided about new ones."""

    accepted: tuple[str, ...] = ()  # content hashes, sorted: renaming a batch changes nothing
    verdicts: tuple[Verdict, ...] = ()
    pending: int = 0  # new batches not validated yet (when only looking)

    def apply(self, config: PipelineConfig) -> PipelineConfig:
        """The config whose data section names the accepted batches (and so keys the data artifact by them)."""
        return config.model_copy(update={"data": config.data.model_copy(update={"batches": self.accepted})})


def is_accepted(store: Store, sha256: str) -> bool:
    """Whether an intact verdict artifact accepts the batch (on an object store, pulled and verified)."""
    return store.problem(VERDICTS, sha256) is None


def look(cfg: DataConfig, store: Store) -> Intake:
    """The batches accepted earlier that are still in the incoming directory; new ones are only counted."""
    found = [b for _, b in scan(cfg.incoming)]
    accepted = {b.sha256 for b in found if isinstance(b, Batch) and is_accepted(store, b.sha256)}
    pending = sum(1 for b in found if not isinstance(b, Batch) or b.sha256 not in accepted)
    return Intake(tuple(sorted(accepted)), pending=pending)


def admit(config: PipelineConfig, store: Store) -> Intake:
    """Validate every new batch in turn against the base data and the batches accepted so far; accept or quarantine.

    A batch that cannot be parsed, or fails any expectation, is quarantined and the others go on. Under the
    store's intake lock, so two runs starting together judge each batch once.
    """
    with store.lock("intake"):
        return _admit(config, store)


def _admit(config: PipelineConfig, store: Store) -> Intake:
    cfg = config.data
    found = scan(cfg.incoming)
    accepted = sorted({b.sha256 for _, b in found if isinstance(b, Batch) and is_accepted(store, b.sha256)})
    new = [(path, b) for path, b in found if not isinstance(b, Batch) or b.sha256 not in accepted]
    if not new:
        return Intake(tuple(accepted))
    x_train, y_train, x_test = _accepted_data(cfg, tuple(accepted))
    verdicts = []
    for path, batch in new:
        if isinstance(batch, DataError):
            verdicts.append(quarantine(path, None, [str(batch)], None, 0))
            continue
        if batch.sha256 in accepted:  # the same content under a second name: it is in the training data once
            continue
        with tempfile.TemporaryDirectory(prefix="mnist-ae-batch-") as tmp:
            failures, summary = _validate(batch, reference(x_train, y_train, x_test), config, Path(tmp))
            if failures:
                verdicts.append(quarantine(path, Path(tmp), failures, batch.sha256, len(batch.y)))
                continue
            ref = store.materialize(VERDICTS, batch.sha256, {"batch": batch.name, "sha256": batch.sha256},
                                    partial(_keep, Path(tmp), summary=summary))
        log.info("accepted batch %s: %d images (%s)", batch.name, len(batch.y), batch.sha256[:12])
        verdicts.append(Verdict(batch.name, batch.sha256, len(batch.y), True, (), ref.path))
        accepted.append(batch.sha256)
        x_train, y_train = np.concatenate([x_train, batch.x]), np.concatenate([y_train, batch.y])
    return Intake(tuple(sorted(accepted)), tuple(verdicts))


def check(config: PipelineConfig, store: Store, batch: Batch, docs: Path) -> Verdict:
    """Whether the next run would accept the batch, judged as `admit` would; the validation report goes to `docs`.

    Records nothing: two batches checked one after the other are validated against each other only by the run.
    """
    accepted = look(config.data, store).accepted
    if batch.sha256 in accepted:
        return Verdict(batch.name, batch.sha256, len(batch.y), True, ("accepted earlier",))
    x_train, y_train, x_test = _accepted_data(config.data, accepted)
    failures, _ = _validate(batch, reference(x_train, y_train, x_test), config, docs)
    return Verdict(batch.name, batch.sha256, len(batch.y), not failures, tuple(failures), str(docs))


def _accepted_data(cfg: DataConfig, accepted: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training images and labels accepted so far (the pinned base set and the accepted batches), and test images."""
    ds, _ = fetch(cfg)  # the data stage's own verified loading
    x_batches, y_batches = load_accepted(cfg.incoming, accepted)
    return np.concatenate([ds.x_train, x_batches]), np.concatenate([ds.y_train, y_batches]), ds.x_test


def _validate(batch: Batch, ref: Reference, config: PipelineConfig, out: Path) -> tuple[list[str], dict[str, Any]]:
    """The batch's failed expectations (none: it passes) and its validation summary; the report goes into `out`."""
    try:
        return [], validate_batch(batch.name, batch.x, batch.y, ref, config.validate_, out)
    except ValidationFailed as exc:
        return exc.failures, exc.summary


def _keep(report: Path, out: Path, *, summary: dict[str, Any]) -> dict[str, Any]:
    """Copy the validation report of an accepted batch into its verdict artifact."""
    shutil.copytree(report, out, dirs_exist_ok=True)
    return summary


def quarantine(path: Path, report: Path | None, failures: list[str], sha256: str | None, images: int) -> Verdict:
    """Move a refused batch aside, with its validation report and its verdict, and say so in one log line."""
    target = path.parent / QUARANTINE / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{path.name}"
    target.mkdir(parents=True)
    if report is not None:
        for item in report.iterdir():
            shutil.move(item, target / item.name)
    shutil.move(path, target / path.name)
    verdict = Verdict(path.name, sha256, images, False, tuple(failures), str(target))
    (target / VERDICT_FILE).write_text(json.dumps(asdict(verdict), indent=2))
    log.warning("quarantined batch %s: %s; moved to %s with its validation report", path.name,
                "; ".join(failures), target)
    return verdict


def listing(cfg: DataConfig, store: Store) -> list[dict[str, Any]]:
    """Every batch of the incoming directory and its quarantine: name, status, images, hash and why."""
    rows: list[dict[str, Any]] = []
    for path, batch in scan(cfg.incoming):
        if isinstance(batch, DataError):
            rows.append({"batch": path.name, "status": "pending", "images": None, "sha256": None,
                         "why": f"cannot be parsed, the next run quarantines it: {batch}"})
        else:
            status = "accepted" if is_accepted(store, batch.sha256) else "pending"
            rows.append({"batch": path.name, "status": status, "images": len(batch.y), "sha256": batch.sha256[:12],
                         "why": "" if status == "accepted" else "the next run validates it"})
    quarantined = sorted((cfg.incoming / QUARANTINE).glob(f"*/{VERDICT_FILE}")) if cfg.incoming else []
    for verdict_file in quarantined:
        verdict = json.loads(verdict_file.read_text())
        rows.append({"batch": verdict["name"], "status": "quarantined", "images": verdict["images"],
                     "sha256": (verdict["sha256"] or "")[:12] or None,
                     "why": "; ".join(verdict["failures"]) + f" (in {verdict_file.parent})"})
    return rows


def report_section(intake: Intake, data_summary: dict[str, Any], split: SplitSpec) -> list[document.Block]:
    """The run report's section on the training data: images seen, batches accepted, batches refused and why."""
    counts = data_summary.get("counts", {})
    extra, base = counts.get("batches", 0), counts.get("train", 0)
    seen = training_images(base, extra, **split)
    blocks: list[document.Block] = [
        document.Heading("Incoming batches", 3),
        document.Paragraph(f"The models trained on {seen:,} images: {seen - extra:,} of the pinned "
                           f"{data_summary.get('dataset', '')} training set and {extra:,} from "
                           f"{len(data_summary.get('batches', []))} accepted incoming batch(es)."),
    ]
    if not intake.verdicts:
        return blocks + [document.Paragraph("No new batch arrived for this run.")]
    rows = tuple((v.name, str(v.images), "accepted" if v.accepted else "quarantined",
                  "; ".join(v.failures) if v.failures else "passed every expectation") for v in intake.verdicts)
    return blocks + [document.Table(("Batch", "Images", "Verdict", "Why"), rows)]
