"""Rendering the report: one `Document` (report.json's data and the blocks that present it) written as
report.json, report.md (with plots/*.png beside it) and a self-contained report.html (plots inlined), so the
three always say the same thing.

Blocks: `Heading`, `Paragraph` (text with Markdown **bold**), `Table` (strings; a bold verdict word colours its
HTML cell) and `Image` (a PNG, or why there is none).
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass
from pathlib import Path

from ..files import write_json_strict


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Table:
    head: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Image:
    title: str
    png: bytes | None  # None: not drawn, for the reason in `why`; b"" from build(plots=False): has data
    why: str
    caption: str


Block = Heading | Paragraph | Table | Image


@dataclass
class Document:
    data: dict  # report.json: every number the blocks show
    blocks: list[Block]


def write_document(doc: Document, out: Path) -> dict[str, str]:
    """report.json, report.md, report.html and plots/ in `out`; returns their paths."""
    (out / "plots").mkdir(parents=True, exist_ok=True)
    write_json_strict(out / "report.json", doc.data)
    for b in doc.blocks:
        if isinstance(b, Image) and b.png:
            (out / image_path(b)).write_bytes(b.png)
    (out / "report.md").write_text(markdown(doc.blocks))
    (out / "report.html").write_text(html_page(doc.blocks))
    return {"markdown": str(out / "report.md"), "html": str(out / "report.html"), "json": str(out / "report.json")}


def image_path(b: Image) -> str:
    slug = "".join(ch if ch.isalnum() else "-" for ch in b.title.lower()).strip("-")[:48]
    return f"plots/{slug}.png"


def markdown(blocks: list[Block]) -> str:
    md: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            md.append("#" * b.level + " " + b.text + "\n")
        elif isinstance(b, Paragraph):
            md.append(b.text + "\n")
        elif isinstance(b, Table):
            md.append("| " + " | ".join(b.head) + " |\n|" + "---|" * len(b.head))
            md += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in b.rows]
            md.append("")
        else:
            md.append(f"### {b.title}\n")
            md.append(f"*{b.why}*\n" if b.png is None else f"![{b.title}]({image_path(b)})\n\n*{b.caption}*\n")
    return "\n".join(md)


STYLE = ("body{font-family:sans-serif;max-width:1400px;margin:auto;padding:1em}table{border-collapse:collapse;"
         "font-size:12px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;vertical-align:top}"
         "img{max-width:100%}.supported,.better{background:#d4f4d4}.contradicted,.worse{background:#f8d4d4}"
         ".inconclusive,.floor{background:#f4f0d0}")


def html_page(blocks: list[Block]) -> str:
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{html.escape(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{_bold(html.escape(b.text))}</p>")
        elif isinstance(b, Table):
            th = "".join(f"<th>{html.escape(h)}</th>" for h in b.head)
            trs = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in b.rows)
            body.append(f"<table><tr>{th}</tr>{trs}</table>")
        else:
            body.append(f"<h3>{html.escape(b.title)}</h3>")
            if b.png is None:
                body.append(f"<p><em>{html.escape(b.why)}</em></p>")
            else:
                body.append(f'<img alt="{html.escape(b.title)}" src="data:image/png;base64,'
                            f'{base64.b64encode(b.png).decode()}"><p><em>{html.escape(b.caption)}</em></p>')
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>dynaformer report</title><style>{STYLE}"
            f"</style></head><body>{''.join(body)}</body></html>")


def _bold(escaped: str) -> str:
    """Markdown **bold** in already-escaped HTML text → <strong>."""
    return re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)


_VERDICT_CLASSES = ("supported", "contradicted", "inconclusive", "better", "worse", "floor")


def _td(cell: str) -> str:
    """A table cell; a bold verdict word gets its colour class."""
    text = cell.replace("**", "")
    word = text.split(" ")[0] if cell.startswith("**") else ""
    cls = f' class="{word}"' if word in _VERDICT_CLASSES else ""
    return f"<td{cls}>{html.escape(text)}</td>"
