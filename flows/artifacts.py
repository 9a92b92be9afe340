"""The run report and the stage report's claim table rendered for Prefect's artifacts, which cannot show files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks import document
from tasks.stages import report
from tasks.stages.files import REPORT_NAME


def prefect_markdown(blocks_file: Path) -> str:
    """The run report as Markdown for a Prefect artifact, which cannot show the report's files.

    A link to the full report comes first; each figure is a placeholder naming it, the configuration dump
    and relative links are left to the full report.
    """
    html_path = blocks_file.parent / f"{REPORT_NAME}.html"
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
                f"**Full report with figures:** [{REPORT_NAME}.html]({html_path.as_uri()}) "
                f"(open `{html_path}` in a browser)."))
    return document.to_markdown(shown)


def accuracy_table(reported: dict[str, Any]) -> list[dict[str, str]]:
    """The stage report's claim table as Prefect table rows: accuracies in %, the test-set size and the verdict of the
    claim (pretrained > ann > softmax) on each row of a model it ranks."""
    rows = reported.get("rows") or []
    if not rows:
        return []
    held = reported.get("claim_held")
    verdict = {True: "held", False: "did not hold", None: "not judged"}[held]
    n = reported.get("n_test")
    level = document.percent(reported.get("confidence") or 0.95, None)
    table = report.claim_table(rows, level)
    return [{**dict(zip(table.header, cells, strict=True)),
             "Test images": f"{n:,}" if isinstance(n, int) else "",
             "Claim": verdict if r["model"] in report.CLAIM_ORDER else "not in the claim"}
            for r, cells in zip(rows, table.rows, strict=True)]
