"""Great Expectations Data Docs that read offline: no CDN scripts, styles or icon fonts, and an index built here.

Great Expectations' site loads Bootstrap, jQuery and Font Awesome from CDNs and builds its index list in the
browser; without network the index is empty and the pass/fail icons are blank. Each page is rewritten with the
remote tags removed and a small inline style that draws the icons as characters, and the index is written as
plain HTML listing every validation page.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

INDEX = "index.html"
VALIDATIONS = "validations"

# Font Awesome classes Great Expectations uses for results, drawn as characters of any font.
_ICONS = {"fa-check-circle": ("\u2714", "#1a7f37"), "fa-check": ("\u2714", "#1a7f37"),
          "fa-times-circle": ("\u2716", "#c62828"), "fa-times": ("\u2716", "#c62828"),
          "fa-exclamation-triangle": ("\u26a0", "#b26a00"), "fa-info-circle": ("\u2139", "#555")}
_CSS = ("body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}table{border-collapse:collapse;margin:.5rem 0}"
        "th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}"
        "th{background:#f3f3f3}.collapse:not(.show),.d-none,.modal{display:none}"
        "i.fas,i.fa,i.far{font-style:normal;display:inline-block;width:1.2em}"
        + "".join(f'.{name}::before{{content:"{char}";color:{color}}}' for name, (char, color) in _ICONS.items())
        )
_REMOTE = re.compile(r"""<script\b[^>]*\bsrc\s*=\s*["']?(?:https?:)?//[^>]*>\s*</script>"""
                     r"""|<(?:link|img)\b[^>]*\b(?:href|src)\s*=\s*["']?(?:https?:)?//[^>]*>""", re.IGNORECASE)
_SCRIPT = re.compile(r"<script\b[^>]*>.*?</script>", re.IGNORECASE | re.DOTALL)


def offline_page(page: str) -> str:
    """The page without remote scripts, styles and inline scripts (they need the remote ones), with our style."""
    page = _SCRIPT.sub("", _REMOTE.sub("", page))
    style = f"<style>{_CSS}</style>"
    return page.replace("</head>", style + "</head>", 1) if "</head>" in page else style + page


def _label(rel: Path) -> str:
    """'mnist-images, validated 2026-11-28 09:58:47 UTC' from validations/<suite>/<run>/<time>/<page>.html."""
    parts = rel.parts
    if len(parts) < 5:
        return rel.as_posix()
    stamp = re.match(r"(\d{4})(\d\d)(\d\d)T(\d\d)(\d\d)(\d\d)", parts[3])
    when = f"{'-'.join(stamp.groups()[:3])} {':'.join(stamp.groups()[3:])} UTC" if stamp else parts[3]
    return f"{parts[1]}, validated {when}"


def _outcome(page: str) -> str:
    """'passed' or 'failed', from the page's own overview (GE marks a failed run with its times-circle icon)."""
    return "failed" if "fa-times" in page else "passed"


def make_offline(docs_dir: Path) -> Path:
    """Rewrite every page of the site under `docs_dir` to read offline, and write its index; return the index."""
    pages = sorted(p for p in docs_dir.rglob("*.html") if p != docs_dir / INDEX)
    entries = []
    for path in pages:
        original = path.read_text(encoding="utf-8")
        path.write_text(offline_page(original), encoding="utf-8")
        rel = path.relative_to(docs_dir)
        if rel.parts[0] == VALIDATIONS:
            entries.append(f'<tr><td><a href="{html.escape(rel.as_posix())}">{html.escape(_label(rel))}</a></td>'
                           f"<td>{_outcome(original)}</td></tr>")
    rows = "".join(entries) or '<tr><td colspan="2">No validation results.</td></tr>'
    index = docs_dir / INDEX
    index.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Data Docs</title>'
        f"<style>{_CSS}</style></head><body><h1>Data Docs: validation results</h1>"
        "<p>Each page lists every expectation of the suite with its observed values.</p>"
        f"<table><thead><tr><th>Validation</th><th>Result</th></tr></thead><tbody>{rows}</tbody></table>"
        "</body></html>\n", encoding="utf-8")
    return index
