"""The TinyLLaVA-Med paper's published rows (paper_rows.json), quoted beside our numbers.

Only numbers read in a named source are stored, as printed there, and shown as printed (50 stays "50", 60.1
stays "60.1"). A value the row's source does not give is shown as "—"; a row no source could be read for (no
values) as "not verified here", with a note under the tables.
"""

from __future__ import annotations

import json
from decimal import Decimal
from functools import cache
from pathlib import Path

from tinymed.analysis.collect import dig
from tinymed.analysis.document import MISSING, Block, Bullets, Heading, Paragraph, Table

PAPER_ROWS = Path(__file__).with_name("paper_rows.json")
PAPER_DATASETS = ("vqa-rad", "slake", "pathvqa")
NOT_VERIFIED = "not verified here"
SECTION_TITLE = "Quoted from the TinyLLaVA-Med paper (published numbers, not measured here)"


@cache
def paper_rows() -> dict:
    """The stored rows, citations (paper, poster) and claims; decimals as Decimal, so "70.70" stays "70.70"."""
    return json.loads(PAPER_ROWS.read_text(encoding="utf-8"), parse_float=Decimal)


def _quoted(row: dict, *keys: str) -> str:
    """row["values"][k1][k2]... as printed; "—" where the source does not give it, NOT_VERIFIED for a row
    without values."""
    if not row["values"]:
        return NOT_VERIFIED
    value = dig(row["values"], *keys)
    return MISSING if value is None else str(value)


def _citation(label: str, source: dict) -> str:
    return (f"{label}: {source['authors']}, \u201c{source['title']}\u201d, {source['venue']} ({source['where']}); "
            f"quoted: {source['quoted']}.")


def _source(row: dict) -> str:
    return "; ".join(part for part in (row.get("source"), row.get("note")) if part)


def _vqa_table(data: dict, labels: dict[str, str]) -> Table:
    header = ["Model (quoted)"]
    for dataset in PAPER_DATASETS:
        header += [f"{labels[dataset]} Open", f"{labels[dataset]} Closed"]
    rows = [[row["model"], *(_quoted(row, d, kind) for d in PAPER_DATASETS for kind in ("open", "closed")),
             _source(row)] for row in data["vqa_rows"]]  # fmt: skip
    return Table(title="Medical VQA (quoted)", caption=data["vqa_convention"], header=[*header, "Source / note"],
                 rows=rows)


def _judge_table(data: dict, group_labels: dict[str, str]) -> Table:
    rows = [[row["model"], *(_quoted(row, g) for g in group_labels), _source(row)] for row in data["judge_rows"]]
    return Table(title="LLM-as-judge (quoted)", caption=data["judge_convention"],
                 header=["Model (quoted)", *group_labels.values(), "Source / note"], rows=rows)


def quoted_section(dataset_labels: dict[str, str], group_labels: dict[str, str]) -> list[Block]:
    """The report section holding the published rows, their sources' citations and what could not be verified."""
    data = paper_rows()
    unverified = [row["model"] for row in data["vqa_rows"] + data["judge_rows"] if not row["values"]]
    blocks: list[Block] = [
        Heading(SECTION_TITLE),
        Paragraph("Sources:"),
        Bullets([_citation("Paper", data["paper"]), _citation("Poster", data["poster"])]),
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
