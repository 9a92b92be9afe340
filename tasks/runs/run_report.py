"""The run report: a summary, the report stage's sections, this run's stages, decision and trend, under `runs/`."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from tasks import document
from tasks.config import PipelineConfig
from tasks.document import percent
from tasks.runs import run_log
from tasks.runs.registry import Decision, Registry
from tasks.stages.files import CONFIG_HEADING, REPORT_NAME, STAGES_HEADING
from tasks.store.artifacts import ArtifactRef, Store, read_manifest

RUNS_DIR = "runs"
# The latest label study's HTML page and its verdict sentences (found by the flow in tasks.study.report).
LatestStudy = tuple[Path, list[str]]


def summary_section(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
                    run: RunInfo, study: LatestStudy | None = None) -> list[document.Block]:
    """What a reader needs first: the run, the verdict, the best model, the champion, the decision, and what the
    latest label study in the store found."""
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
        facts.append(f"Best model: {best}, {percent(rows[best]['accuracy'])} test accuracy")
    champion = Registry(store.url, config.data.dataset).champion()
    if champion:
        accuracy = (champion.get("metrics") or {}).get("accuracy")
        facts.append(f"Champion for {config.data.dataset}: model {champion['key'][:12]}"
                     + (f", {percent(accuracy)} test accuracy" if accuracy is not None else "")
                     + (" (this run's model)" if "finetune" in refs and champion["key"] == refs["finetune"].key
                        else ""))
    else:
        facts.append(f"No champion for {config.data.dataset} yet")
    facts.append(_decision_sentence(decision))
    blocks: list[document.Block] = []
    if study:
        page, verdicts = study
        facts.append(f"Latest label-efficiency study: {page.relative_to(store.root)} in this store")
        if verdicts:
            # Beside this run's claim, which is made with all its training labels and reported as it came out.
            blocks = [document.Paragraph("What the latest label-efficiency study in this store found, against "
                                         "the best-tuned network from scratch with only a few labels:"),
                      document.Bullets(tuple(verdicts))]
    return [document.Heading("Summary"), document.Bullets(tuple(facts)), *blocks]


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
    if run_log.model_names(records):  # runs that evaluated something; a pretrain-only profile has no trend
        trained = run_log.models(records)
        blocks += [document.Heading("Trend over past runs", 3),
                   document.Paragraph(
                       f"Accuracy of the pretrained model over recent trained models is {run_log.trend(records)} "
                       f"({run_log.plural(len(trained), 'trained model')} in {run_log.plural(len(records), 'run')} "
                       f"of profile {records[-1].get('profile')}; a run that found its models in the store scored "
                       "the same models again and is not a new point).")]
        run_log.trend_figure(records, out / "trend.png")
        blocks += [document.Image("trend.png", "Test accuracy per trained model"),
                   document.table_from_records(run_log.trend_table(records))]
    return blocks


def run_report(config: PipelineConfig, store: Store, refs: dict[str, ArtifactRef], decision: Decision | None,
               run: RunInfo, extra: list[document.Block] | None = None,
               study: LatestStudy | None = None) -> dict[str, Path]:
    """Write this run's report under `<store>/runs/`, atomically: a summary first, the report stage's sections,
    this run's section and `extra` blocks, and the configuration last. `study` is the latest label study's page
    and verdict sentences, quoted in the summary."""
    report_dir = Path(refs["report"].path)
    name = f"{run.at:%Y%m%dT%H%M%SZ}-{(run.id or uuid.uuid4().hex)[:8]}"
    title, *parts = document.sections(document.load_blocks(report_dir / document.BLOCKS_FILE))

    def heading(part: list[document.Block]) -> str:
        return part[0].text if isinstance(part[0], document.Heading) else ""

    # The stage's own table of artifacts gives way to this run's, and the configuration moves to the end.
    body = [b for p in parts if heading(p) not in (STAGES_HEADING, CONFIG_HEADING) for b in p]
    configuration = [b for p in parts if heading(p) == CONFIG_HEADING for b in p]
    comparable = [r for r in run_log.read(store.url)
                  if r.get("profile") == config.profile and r.get("dataset", "mnist") == config.data.dataset]
    with store.staged(f"{RUNS_DIR}/{name}") as staging:
        blocks = [*title, *summary_section(config, store, refs, decision, run, study), *body,
                  *run_section(store, refs, decision, comparable, staging, run), *(extra or []),
                  *configuration]
        document.render(blocks, staging, REPORT_NAME, assets=report_dir)
    final = store.root / RUNS_DIR / name
    return {"markdown": final / f"{REPORT_NAME}.md", "html": final / f"{REPORT_NAME}.html",
            "blocks": final / document.BLOCKS_FILE}


