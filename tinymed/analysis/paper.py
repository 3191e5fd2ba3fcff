"""The TinyLLaVA-Med paper's published rows (paper_rows.json), quoted beside our numbers.

Only numbers read in a named source are stored; the rest are null and shown as "not verified here".
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from tinymed.analysis.document import Block, Bullets, Heading, Paragraph, Table, cell

PAPER_ROWS = Path(__file__).with_name("paper_rows.json")
PAPER_DATASETS = ("vqa-rad", "slake", "pathvqa")
NOT_VERIFIED = "not verified here"
SECTION_TITLE = "Quoted from the TinyLLaVA-Med paper (published numbers, not measured here)"


@cache
def paper_rows() -> dict:
    """The stored rows, citation and claims."""
    return json.loads(PAPER_ROWS.read_text(encoding="utf-8"))


def _quoted(value: float | None) -> str:
    return NOT_VERIFIED if value is None else cell(value)


def _source(row: dict) -> str:
    return "; ".join(part for part in (row.get("source"), row.get("note")) if part)


def _vqa_table(data: dict, labels: dict[str, str]) -> Table:
    header = ["Model (quoted)"]
    for dataset in PAPER_DATASETS:
        header += [f"{labels[dataset]} Open", f"{labels[dataset]} Closed"]
    rows = []
    for row in data["vqa_rows"]:
        values = row["values"]
        cells = [_quoted(values.get(d, {}).get(kind)) for d in PAPER_DATASETS for kind in ("open", "closed")]
        rows.append([row["model"], *cells, _source(row)])
    return Table(title="Medical VQA (quoted)", caption=data["vqa_convention"], header=[*header, "Source / note"],
                 rows=rows)


def _judge_table(data: dict, group_labels: dict[str, str]) -> Table:
    rows = [[row["model"], *(_quoted(row["values"].get(g)) for g in group_labels), _source(row)]
            for row in data["judge_rows"]]
    return Table(title="LLM-as-judge (quoted)", caption=data["judge_convention"],
                 header=["Model (quoted)", *group_labels.values(), "Source / note"], rows=rows)


def quoted_section(dataset_labels: dict[str, str], group_labels: dict[str, str]) -> list[Block]:
    """The report section holding the paper's rows, its citation and what could not be verified."""
    data = paper_rows()
    paper = data["paper"]
    unverified = [row["model"] for row in data["vqa_rows"] + data["judge_rows"] if not row["values"]]
    blocks: list[Block] = [
        Heading(SECTION_TITLE),
        Paragraph(f"Source: {paper['authors']}, \u201c{paper['title']}\u201d, {paper['venue']} "
                  f"({paper['where']}). {paper['tables']}."),
        _vqa_table(data, dataset_labels),
        _judge_table(data, group_labels),
        Paragraph("Published claims (quoted):"),
        Bullets([f"{claim['text']} [{claim['source']}]" for claim in data["claims"]]),
    ]
    if unverified:
        blocks.append(Paragraph(
            f"Note: the published table rows for {', '.join(sorted(set(unverified)))} are marked "
            f"'{NOT_VERIFIED}': they could not be read from a source available when this report code was written, "
            "so no number is shown rather than an unchecked one. Fill them in tinymed/analysis/paper_rows.json "
            "from the paper's tables, with the table number."))
    return blocks
