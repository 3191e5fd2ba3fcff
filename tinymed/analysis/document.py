"""A report as a list of blocks (headings, paragraphs, bullets, tables, images) and its two renderings:
Markdown (images linked beside it) and a self-contained HTML page (inline CSS, images as data URIs)."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

MISSING = "—"


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Image:
    path: Path  # a PNG written beside the report
    alt: str


@dataclass
class Table:
    """Cells are formatted strings; `caption` states the metric convention of every number."""

    title: str
    caption: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)


Block = Heading | Paragraph | Bullets | Image | Table

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:72rem;margin:2rem auto;
     padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:right}
th:first-child,td:first-child{text-align:left}
thead th{background:#f2f2f2}
.caption{color:#555;font-size:.85rem;margin:.25rem 0}
img{max-width:100%;height:auto;border:1px solid #eee}
"""


def cell(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or an em dash where there is none."""
    return MISSING if value is None else f"{value:.{digits}f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table_markdown(table: Table) -> str:
    lines = [f"### {table.title}", "", table.caption, ""]
    lines.append("| " + " | ".join(map(_md_cell, table.header)) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.header))) + "|")
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
    return "\n".join(lines)


def _block_markdown(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"{'#' * level} {text}"
        case Paragraph(text):
            return text
        case Bullets(items):
            return "\n".join(f"- {item}" for item in items)
        case Image(path, alt):
            return f"![{alt}]({path.name})"
        case Table():
            return _table_markdown(block)
    raise TypeError(f"not a report block: {block!r}")


def to_markdown(blocks: list[Block]) -> str:
    """The report as Markdown; images are linked by file name (they sit beside report.md)."""
    return "\n\n".join(map(_block_markdown, blocks)) + "\n"


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return (f"<h3>{escape(table.title)}</h3>\n<p class=\"caption\">{escape(table.caption)}</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _block_html(block: Block) -> str:
    match block:
        case Heading(text, level):
            return f"<h{level}>{escape(text)}</h{level}>"
        case Paragraph(text):
            return f"<p>{escape(text)}</p>"
        case Bullets(items):
            return "<ul>" + "".join(f"<li>{escape(item)}</li>" for item in items) + "</ul>"
        case Image(path, alt):
            return f'<p><img src="{_data_uri(path)}" alt="{escape(alt)}"></p>'
        case Table():
            return _table_html(block)
    raise TypeError(f"not a report block: {block!r}")


def to_html(blocks: list[Block], title: str) -> str:
    """A self-contained HTML page: inline CSS, images embedded as base64 data URIs, no external links."""
    body = "\n".join(map(_block_html, blocks))
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n{body}\n</body></html>\n")
