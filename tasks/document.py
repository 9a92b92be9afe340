"""A small document model: blocks rendered to Markdown and to one self-contained HTML file.

`blocks.json` keeps the list, so a later step can load a document, append a section and render it again.
"""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

BLOCKS_FILE = "blocks.json"

@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]


@dataclass(frozen=True)
class Table:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Image:
    """A figure file, its path relative to the report's directory."""

    path: str
    alt: str
    caption: str = ""


@dataclass(frozen=True)
class Code:
    text: str
    language: str = ""


@dataclass(frozen=True)
class Link:
    """A paragraph that is one link, its target relative to the report's directory (or absolute)."""

    href: str
    text: str


Block = Heading | Paragraph | Bullets | Table | Image | Code | Link
_KINDS: dict[str, type] = {"heading": Heading, "paragraph": Paragraph, "bullets": Bullets, "table": Table,
                           "image": Image, "code": Code, "link": Link}
FOLDED_CODE_LINES = 15  # longer code blocks (a config dump) are folded in HTML until the reader opens them
_KIND_OF = {cls: kind for kind, cls in _KINDS.items()}


def percent(share: float | None, digits: int | None = 2, missing: str = "") -> str:
    """A share as a percentage, 0.9612 -> "96.12 %"; `digits=None` keeps the digits it needs (0.105 -> "10.5 %").

    Every percentage the product shows (reports, tables, log lines, error messages) is written by this function.
    """
    if share is None:
        return missing
    return f"{100 * share:g} %" if digits is None else f"{100 * share:.{digits}f} %"


def table_from_records(records: list[dict[str, Any]]) -> Table:
    """A table whose columns are the records' keys in first-seen order."""
    header = list(dict.fromkeys(k for r in records for k in r))
    return Table(tuple(header), tuple(tuple(_cell(r.get(k)) for k in header) for r in records))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sections(blocks: Sequence[Block], level: int = 2) -> list[list[Block]]:
    """The blocks cut before every heading of `level`; the first part is what precedes the first one (the title)."""
    parts: list[list[Block]] = [[]]
    for b in blocks:
        if isinstance(b, Heading) and b.level == level:
            parts.append([])
        parts[-1].append(b)
    return parts


def save_blocks(blocks: list[Block], path: Path) -> Path:
    """Write the blocks as a JSON list of {"kind": ..., fields...}."""
    path.write_text(json.dumps([{"kind": _KIND_OF[type(b)], **asdict(b)} for b in blocks], indent=1))
    return path


def load_blocks(path: Path) -> list[Block]:
    """Read blocks written by `save_blocks`."""
    blocks: list[Block] = []
    for raw in json.loads(Path(path).read_text()):
        cls = _KINDS.get(raw.get("kind", ""))
        if cls is None:
            raise ValueError(f"{path}: unknown block kind {raw.get('kind')!r}")
        values = {f.name: raw[f.name] for f in fields(cls) if f.name in raw}
        if cls is Bullets:
            values["items"] = tuple(values["items"])
        if cls is Table:
            values["header"] = tuple(values["header"])
            values["rows"] = tuple(tuple(row) for row in values["rows"])
        blocks.append(cls(**values))
    return blocks


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown; images stay links to the files next to it."""
    parts = []
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Paragraph):
            parts.append(b.text)
        elif isinstance(b, Bullets):
            parts.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in b.header) + " |",
                     "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            parts.append("\n".join(lines))
        elif isinstance(b, Image):
            parts.append(f"![{b.alt}]({b.path})" + (f"\n\n*{b.caption}*" if b.caption else ""))
        elif isinstance(b, Code):
            parts.append(f"```{b.language}\n{b.text}\n```")
        elif isinstance(b, Link):
            parts.append(f"[{b.text}]({b.href})")
    return "\n\n".join(parts) + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;display:block;overflow-x:auto;max-width:100%}
th,td{border:1px solid #ccc;padding:.25rem .6rem;text-align:left}
td{font-variant-numeric:tabular-nums;white-space:nowrap}th{background:#f3f3f3}img{max-width:100%}
figure{margin:1rem 0}figcaption{color:#555;font-size:.9em}
pre{background:#f6f6f6;padding:.75rem;overflow-x:auto;font-size:.85em}summary{cursor:pointer;color:#355}
nav.toc{background:#f7f7f7;border:1px solid #ddd;padding:.5rem 1.2rem;margin:1rem 0}nav.toc ul{margin:.3rem 0}
nav.toc li{margin:.15rem 0}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}"""
_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}


def _data_uri(path: Path) -> str:
    mime = _MIME.get(path.suffix.lower())
    if mime is None:
        raise ValueError(f"{path.name}: unsupported image type")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def anchor(text: str) -> str:
    """The id of a heading: lower case, runs of other characters as one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "section"


def _toc(blocks: Sequence[Block]) -> str:
    """A table of contents of the level-2 headings (with their level-3 headings nested), or nothing for short pages."""
    entries: list[tuple[Heading, list[Heading]]] = []
    for b in blocks:
        if isinstance(b, Heading) and b.level == 2:
            entries.append((b, []))
        elif isinstance(b, Heading) and b.level == 3 and entries:
            entries[-1][1].append(b)
    if len(entries) < 3:
        return ""
    e = html.escape

    def item(h: Heading, children: list[Heading]) -> str:
        nested = "<ul>" + "".join(item(c, []) for c in children) + "</ul>" if children else ""
        return f'<li><a href="#{anchor(h.text)}">{e(h.text)}</a>{nested}</li>'

    return '<nav class="toc"><strong>Contents</strong><ul>' + "".join(item(*x) for x in entries) + "</ul></nav>"


def to_html(blocks: list[Block], assets: Path, title: str) -> str:
    """One self-contained HTML page: images (resolved against `assets`) inlined as data URIs, a table of contents
    after the title."""
    e = html.escape
    parts = []
    toc = _toc(blocks)
    for b in blocks:
        if isinstance(b, Heading):
            level = min(max(b.level, 1), 6)
            parts.append(f'<h{level} id="{anchor(b.text)}">{e(b.text)}</h{level}>')
            if level == 1 and toc:
                parts.append(toc)
                toc = ""
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{e(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            caption = f"<figcaption>{e(b.caption)}</figcaption>" if b.caption else ""
            parts.append(f'<figure><img src="{_data_uri(assets / b.path)}" alt="{e(b.alt)}">{caption}</figure>')
        elif isinstance(b, Code):
            code = f"<pre><code>{e(b.text)}</code></pre>"
            lines = b.text.count("\n") + 1
            if lines > FOLDED_CODE_LINES:
                code = f"<details><summary>Show all {lines} lines</summary>{code}</details>"
            parts.append(code)
        elif isinstance(b, Link):
            parts.append(f'<p><a href="{e(b.href)}">{e(b.text)}</a></p>')
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{e(title)}</title>\n'
            f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def render(blocks: list[Block], out_dir: Path, name: str, assets: Path | None = None) -> dict[str, Path]:
    """Write `<name>.md`, `<name>.html` and `blocks.json` into `out_dir`.

    Image paths are relative to `out_dir`; an image not there yet is copied from `assets` (an earlier
    report's directory), so a report loaded from one directory can be extended and re-rendered into another.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for b in blocks:
        target = out_dir / b.path if isinstance(b, Image) else None
        if target is not None and not target.exists() and assets is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(assets / target.relative_to(out_dir), target)
    title = next((b.text for b in blocks if isinstance(b, Heading) and b.level == 1), name)
    md, page = out_dir / f"{name}.md", out_dir / f"{name}.html"
    md.write_text(to_markdown(blocks), encoding="utf-8")
    page.write_text(to_html(blocks, out_dir, title), encoding="utf-8")
    save_blocks(blocks, out_dir / BLOCKS_FILE)
    return {"markdown": md, "html": page, "blocks": out_dir / BLOCKS_FILE}
