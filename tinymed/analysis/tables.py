"""A report table (title, caption stating the metric convention, header, rows) and its Markdown/HTML forms."""

from __future__ import annotations

from html import escape

from pydantic import BaseModel

MISSING = "—"


class Table(BaseModel):
    """Cells are already formatted strings; `caption` says what every number means."""

    title: str
    caption: str
    header: list[str]
    rows: list[list[str]]


def cell(value: float | None, digits: int = 2) -> str:
    """A number with fixed decimals, or an em dash where there is none."""
    return MISSING if value is None else f"{value:.{digits}f}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(table: Table) -> str:
    """The table as a GitHub-flavoured Markdown section."""
    lines = [f"### {table.title}", "", table.caption, ""]
    lines.append("| " + " | ".join(map(_md_cell, table.header)) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(table.header))) + "|")
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def to_html(table: Table) -> str:
    """The table as an HTML section (escaped; no external references)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    return (f"<h3>{escape(table.title)}</h3>\n<p class=\"caption\">{escape(table.caption)}</p>\n"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n")
