"""What a run records after its stages: the promotion decision, the history record and the run's own report."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks import document
from tasks.config import PipelineConfig
from tasks.data.splits import load_splits
from tasks.ml.models import MODEL_FILES
from tasks.runs import history
from tasks.runs.registry import MODEL, Decision, Registry, RegistryError, decide
from tasks.stages import report
from tasks.stages.download import fingerprint
from tasks.stages.evaluate import METRICS_FILE, load_predictions, predict_with
from tasks.store.artifacts import ArtifactError, ArtifactRef, Store, key_of, read_manifest
from tasks.study import report as study_report

log = logging.getLogger(__name__)

CHALLENGER = MODEL  # the notebook's model: encoder pretrained as an autoencoder, then fine-tuned
BASELINE = "softmax"  # the quality gate: a challenger must beat the softmax regression of its own run
RUNS_DIR = "runs"


def candidate(config: PipelineConfig, refs: dict[str, ArtifactRef]) -> dict[str, Any]:
    """This run's fine-tuned model as a registry candidate."""
    metrics = json.loads((Path(refs["evaluate"].path) / METRICS_FILE).read_text())["models"][CHALLENGER]
    stage, file = MODEL_FILES[CHALLENGER]
    return {"key": refs[stage].key, "model_path": str(Path(refs[stage].path) / file),
            "accuracy": metrics["accuracy"], "n": metrics["n"], "data_fingerprint": fingerprint(config.data),
            "evaluate_key": refs["evaluate"].key}


def _champion_correct(store: Store, champion: dict[str, Any], config: PipelineConfig,
                      refs: dict[str, ArtifactRef]) -> np.ndarray | None:
    """The champion's per-example correctness on this run's test set (re-scored when the test set changed).

    None when it must be re-scored but this run did not load the data (a run with --only).
    """
    evaluate_key = champion.get("evaluate_key") or "-"
    if champion.get("data_fingerprint") == fingerprint(config.data) and store.problem("evaluate", evaluate_key) is None:
        return load_predictions(store.path("evaluate", evaluate_key)).correct(CHALLENGER)
    if "download" not in refs:
        return None
    log.info("champion %s was scored on other data; scoring it on this run's test set", champion["key"][:12])
    splits = load_splits(refs["download"].path, config.data.split())
    try:
        model = Registry(store.url, config.data.dataset).model(champion["key"])
        probabilities, _ = predict_with(model, splits.x_test)
    except ArtifactError as exc:
        raise RegistryError(f"champion {exc}: it cannot be re-scored. Re-run the pipeline with the settings that "
                            "trained it, or `mnist-ae rollback`; this run's model is judged by the next run") from None
    return probabilities.argmax(axis=1) == splits.y_test


def promote(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], flow_run_id: str | None,
            validated: bool) -> Decision | None:
    """Judge this run's evaluated model against the dataset's champion, once, and promote it when the rule says so.

    Whether the evaluation was computed in this run or found in the store, it is judged unless the
    registry already holds an event for it (so a run whose publishing failed is judged by a later run,
    and a rollback is never undone); None when it was not judged now.
    """
    challenger = candidate(config, refs)
    predictions = load_predictions(refs["evaluate"].path)
    correct = predictions.correct(CHALLENGER)
    baseline = predictions.correct(BASELINE) if BASELINE in predictions.predicted else None

    def judge(champion: dict[str, Any] | None) -> Decision | None:
        if champion and champion["key"] == challenger["key"]:
            acc = float(correct.mean())
            return Decision(False, f"this run's model {challenger['key'][:12]} is already the champion",
                            acc, acc, 0, 0, 1.0)
        champion_correct = None if champion is None else _champion_correct(store, champion, config, refs)
        if champion is not None and champion_correct is None:
            log.warning("model %s not judged: the champion must be re-scored on this run's test set, which needs "
                        "the download stage; a run that includes it will judge the model", challenger["key"][:12])
            return None
        return decide(champion_correct, correct, config.promote, validation_passed=validated,
                      baseline_correct=baseline)

    event = Registry(store.url, config.data.dataset).record_decision(challenger, judge, flow_run_id)
    return None if event is None else Decision(**event["decision"])


def stored_candidates(store: Store, dataset: str) -> dict[str, dict[str, Any]]:
    """Every fine-tuned model of `dataset` with an intact evaluation in the store, as registry candidates by key.

    So a model whose run failed before it was judged can still be promoted by hand. The data
    fingerprint is left out, which makes a later challenger re-score such a champion rather than trust it.
    """
    stage, file = MODEL_FILES[CHALLENGER]
    found: dict[str, dict[str, Any]] = {}
    for manifest in store.manifests("evaluate"):
        inputs = manifest.get("key_inputs", {})
        upstream = inputs.get("upstream", {})
        key, accuracy = upstream.get(stage), manifest.get("summary", {}).get("accuracy", {}).get(CHALLENGER)
        if key is None or accuracy is None or _dataset_of(store, upstream.get("download")) != dataset:
            continue
        found.setdefault(key, {"key": key, "model_path": f"{stage}/{key}/{file}", "accuracy": accuracy,
                               "n": manifest["summary"].get("n_test"), "data_fingerprint": None,
                               "evaluate_key": manifest.get("key")})
    return found


def _dataset_of(store: Store, download_key: str | None) -> str | None:
    """The dataset of a stored download artifact, from its manifest's summary (what the download stage returned)."""
    try:
        return store.manifest("download", download_key or "-")["summary"]["dataset"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
           flow_run_id: str | None, *, flow_run_name: str | None = None,
           wall_s: float | None = None) -> dict[str, Any]:
    """Append this run to the store's run history.

    A stage found in the store cost this run no computing: its `duration_s` is 0, not the seconds the run that
    built it spent; its key says which artifact it was, so a run that re-scored the same models is not a new point.
    """
    accuracy = refs["evaluate"].summary.get("accuracy", {}) if "evaluate" in refs else {}
    return history.append(store.url, {
        "flow_run_id": flow_run_id,
        "flow_run_name": flow_run_name,
        "profile": config.profile,
        "dataset": config.data.dataset,
        "data_fingerprint": fingerprint(config.data),
        "config_hash": key_of(config.reported())[:16],
        "wall_s": None if wall_s is None else round(wall_s, 1),
        "stages": {s: {"cached": r.cached, "duration_s": 0.0 if r.cached else round(r.duration_s, 3),
                       "key": r.key[:16]} for s, r in refs.items()},
        "accuracy": accuracy,
        "promotion": None if decision is None else {"promote": decision.promote, "reason": decision.reason},
    })


def summary_section(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
                    run: RunInfo) -> list[document.Block]:
    """What a reader needs first: the run, the verdict, the best model, the champion and the decision."""
    reported = refs["report"].summary if "report" in refs else {}
    computed = [s for s, r in refs.items() if not r.cached]
    facts = [f"Profile {config.profile}, dataset {config.data.dataset}"
             + (f", {reported['n_test']:,} test images" if reported.get("n_test") else ""),
             f"Flow run {run.name or '(none)'} ({run.id or 'no id'}), {run.at:%Y-%m-%d %H:%M} UTC"
             + (f", {run.wall_s:,.1f} s" if run.wall_s is not None else "")
             + f": {len(computed)} of {len(refs)} stages computed, the rest found in the store"]
    if reported.get("verdict"):
        facts.append(reported["verdict"].split(". ")[0].rstrip(".") + ".")
    rows = {r["model"]: r for r in reported.get("rows") or []}
    if (best := reported.get("best_model")) in rows:
        facts.append(f"Best model: {best}, {100 * rows[best]['accuracy']:.2f} % test accuracy")
    champion = Registry(store.url, config.data.dataset).champion()
    if champion:
        accuracy = (champion.get("metrics") or {}).get("accuracy")
        facts.append(f"Champion for {config.data.dataset}: model {champion['key'][:12]}"
                     + (f", {100 * accuracy:.2f} % test accuracy" if accuracy is not None else "")
                     + (" (this run's model)" if "finetune" in refs and champion["key"] == refs["finetune"].key
                        else ""))
    else:
        facts.append(f"No champion for {config.data.dataset} yet")
    facts.append(_decision_sentence(decision))
    if study := study_report.latest(store):
        facts.append(f"Latest label-efficiency study: {study.relative_to(store.root)} in this store")
    return [document.Heading("Summary"), document.Bullets(tuple(facts))]


def _decision_sentence(decision: Decision | None) -> str:
    if decision is None:
        return ("The champion was not challenged: no model was evaluated in this run, or its evaluation came "
                "from the store and was judged by an earlier run.")
    verdict = "promoted to champion" if decision.promote else "not promoted"
    return f"This run's model was {verdict}: {decision.reason}."


@dataclass(frozen=True)
class RunInfo:
    """The flow run a report belongs to."""

    id: str | None
    name: str | None
    at: datetime
    wall_s: float | None = None


def run_section(store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
                records: list[dict[str, Any]], out: Path, run: RunInfo) -> list[document.Block]:
    """The report blocks that change with every run: stage outcomes, promotion decision, trend.

    `records` are the past runs comparable with this one (same profile and dataset), oldest first.
    """
    rows = []
    for s, r in refs.items():
        result = f"cached (built {r.created_at[:16].replace('T', ' ')})" if r.cached else "computed"
        seconds = "-" if r.cached else f"{r.duration_s:,.1f}"
        code = (read_manifest(Path(r.path)).get("key_inputs") or {}).get("code_version", "")
        rows.append((s, result, seconds, r.key[:12], code))
    blocks: list[document.Block] = [
        document.Heading("This run"),
        document.Paragraph(f"Flow run {run.name or '(none)'} ({run.id or 'no id'}) at "
                           f"{run.at.isoformat(timespec='seconds')}. Each stage's artifact, computed in this run or "
                           "found in the store (then it cost this run no training):"),
        document.Table(("Stage", "Result", "Seconds in this run", "Key", "Code version"), tuple(rows)),
        document.Heading("Promotion decision", 3),
        document.Paragraph(_decision_sentence(decision)),
    ]
    if history.model_names(records):  # runs that evaluated something; a pretrain-only profile has no trend
        trained = history.models(records)
        blocks += [document.Heading("Trend over past runs", 3),
                   document.Paragraph(
                       f"Accuracy of the pretrained model over recent trained models is {history.trend(records)} "
                       f"({history.plural(len(trained), 'trained model')} in {history.plural(len(records), 'run')} "
                       f"of profile {records[-1].get('profile')}; a run that found its models in the store scored "
                       "the same models again and is not a new point).")]
        history.trend_figure(records, out / "trend.png")
        blocks += [document.Image("trend.png", "Test accuracy per trained model"),
                   document.table_from_records(history.trend_table(records))]
    return blocks


def run_report(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
               run: RunInfo, extra: list[document.Block] | None = None) -> dict[str, Path]:
    """Write this run's report under `<store>/runs/`, atomically: a summary first, the report stage's sections,
    this run's section and `extra` blocks, and the configuration last."""
    report_dir = Path(refs["report"].path)
    name = f"{run.at:%Y%m%dT%H%M%SZ}-{(run.id or uuid.uuid4().hex)[:8]}"
    title, *parts = document.sections(document.load_blocks(report_dir / document.BLOCKS_FILE))

    def heading(part: list[document.Block]) -> str:
        return part[0].text if isinstance(part[0], document.Heading) else ""

    # The stage's own table of artifacts gives way to this run's, and the configuration moves to the end.
    body = [b for p in parts if heading(p) not in (report.STAGES_HEADING, report.CONFIG_HEADING) for b in p]
    configuration = [b for p in parts if heading(p) == report.CONFIG_HEADING for b in p]
    comparable = [r for r in history.read(store.url)
                  if r.get("profile") == config.profile and r.get("dataset", "mnist") == config.data.dataset]
    with store.staged(f"{RUNS_DIR}/{name}") as staging:
        blocks = [*title, *summary_section(config, store, refs, decision, run), *body,
                  *run_section(store, refs, decision, comparable, staging, run), *(extra or []),
                  *configuration]
        document.render(blocks, staging, report.REPORT_NAME, assets=report_dir)
    final = store.root / RUNS_DIR / name
    return {"markdown": final / f"{report.REPORT_NAME}.md", "html": final / f"{report.REPORT_NAME}.html",
            "blocks": final / document.BLOCKS_FILE}


def prefect_markdown(blocks_file: Path) -> str:
    """The run's report as Markdown for a Prefect artifact, which cannot show the report's files.

    A link to the full report comes first; each figure is a placeholder naming it, the configuration dump
    and relative links are left to the full report.
    """
    html_path = blocks_file.parent / f"{report.REPORT_NAME}.html"
    blocks = document.load_blocks(blocks_file)
    shown: list[document.Block] = []
    for b in blocks:
        if isinstance(b, document.Image):
            shown.append(document.Paragraph(f"*[Figure: {b.alt}. See the full report.]*"))
        elif isinstance(b, document.Code):
            shown.append(document.Paragraph("*[The whole configuration as JSON is in the full report.]*"))
        elif isinstance(b, document.Link):
            target = (blocks_file.parent / b.href).resolve()
            shown.append(document.Paragraph(f"{b.text}: `{target}`"))
        else:
            shown.append(b)
        if isinstance(b, document.Heading) and b.level == 1:
            shown.append(document.Paragraph(
                f"**Full report with figures:** [{report.REPORT_NAME}.html]({html_path.as_uri()}) "
                f"(open `{html_path}` in a browser)."))
    return document.to_markdown(shown)


def accuracy_table(reported: dict[str, Any]) -> list[dict[str, str]]:
    """The report's claim table as Prefect table rows: accuracies in %, the test-set size and the verdict of the
    claim (pretrained > ann > softmax) on each row of a model it ranks."""
    rows = reported.get("rows") or []
    if not rows:
        return []
    held = reported.get("claim_held")
    verdict = {True: "held", False: "did not hold", None: "not judged"}[held]
    n = reported.get("n_test")
    level = f"{round(100 * (reported.get('confidence') or 0.95))} %"
    table = report.claim_table(rows, level)
    return [{**dict(zip(table.header, cells, strict=True)),
             "Test images": f"{n:,}" if isinstance(n, int) else "",
             "Claim": verdict if r["model"] in report.CLAIM_ORDER else "not in the claim"}
            for r, cells in zip(rows, table.rows, strict=True)]
