"""Questions to judge: LLaVA-Med's question file (qa50) or any dataset the data layer reads.

Groups follow LLaVA-Med's ``llava/eval/summarize_gpt_review.py``: the question `type`
(conversation, detailed_description) and the domain = the first true flag in the order
chest_xray, mri, histology, gross, ct_scan. Dataset samples are grouped by their modality (by
their organ when they have none, as VQA-RAD).
"""

from __future__ import annotations

import json
from pathlib import Path

from tinymed.data import DataError, MedVQASample
from tinymed.evaluate.judge.protocol import JudgeItem
from tinymed.io import read_jsonl

DOMAIN_ORDER = ("chest_xray", "mri", "histology", "gross", "ct_scan")
TYPE_ORDER = ("conversation", "detailed_description")
_QA50_FIELDS = ("question_id", "text", "fig_caption")


def domain_of(domain_flags: dict) -> str | None:
    """The first true flag in LLaVA-Med's order, or None when none is set."""
    return next((d for d in DOMAIN_ORDER if domain_flags.get(d)), None)


def _groups(meta: dict) -> list[str]:
    groups = [meta["type"]] if meta.get("type") else []
    domain = domain_of(meta["domain"]) if isinstance(meta.get("domain"), dict) else None
    if domain:
        groups.append(domain)
    elif meta.get("modality") or meta.get("organ"):
        groups.append(str(meta.get("modality") or meta["organ"]))
    return groups


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    rows = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(rows, list):
        raise DataError("expected a JSON list of questions", file=path)
    return rows


def is_llava_med_question_file(path: str | Path) -> bool:
    """True for a LLaVA-Med question file (rows with question_id, text, fig_caption)."""
    path = Path(path)
    if not path.is_file() or path.suffix not in (".json", ".jsonl"):
        return False
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
    try:
        row = json.loads(first)
    except json.JSONDecodeError:
        return False
    return isinstance(row, dict) and all(k in row for k in _QA50_FIELDS)


def item_from_qa50_row(row: dict, image_root: Path | None = None) -> JudgeItem:
    """One LLaVA-Med qa50 row as a JudgeItem (context fields as LLaVA-Med passes them)."""
    image = row.get("image")
    return JudgeItem(
        id=str(row["question_id"]),
        question=row["text"],
        fig_label=row.get("fig_label", ""),
        fig_caption=row["fig_caption"],
        fig_context=str(row.get("in_text_mention", [])),  # LLaVA-Med interpolates the raw list
        gpt4_answer=row.get("gpt4_answer"),
        groups=_groups(row),
        image=str(image_root / image) if image_root and image else image,
    )


def read_llava_med_questions(path: str | Path, image_root: str | Path | None = None) -> list[JudgeItem]:
    """Read a LLaVA-Med question file (JSONL or JSON list); a bad row raises DataError naming it."""
    path = Path(path)
    root = Path(image_root) if image_root else None
    items = []
    for i, row in enumerate(_read_rows(path), start=1):
        try:
            items.append(item_from_qa50_row(row, root))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"not a LLaVA-Med question row: {exc!r}", file=path, row=i) from exc
    return items


def _question_text(sample: MedVQASample) -> str:
    return sample.question.replace("<image>", "").strip()


def item_from_sample(sample: MedVQASample) -> JudgeItem:
    """A dataset sample as a JudgeItem: its answer is the context; a caption in `extra` is used."""
    extra = sample.extra
    return JudgeItem(
        id=sample.id,
        question=_question_text(sample),
        fig_label=extra.get("fig_label", ""),
        fig_caption=extra.get("fig_caption"),
        fig_context=str(extra["in_text_mention"]) if "in_text_mention" in extra else None,
        ground_truth=sample.answer,
        gpt4_answer=extra.get("gpt4_answer"),
        groups=_groups(sample.metadata()),
        image=sample.image,
    )


def load_judge_items(
    source: str | Path,
    dataset: str | None = None,
    split: str = "test",
    image_root: str | Path | None = None,
) -> tuple[list[JudgeItem], dict[str, MedVQASample]]:
    """Items to judge, and the dataset samples by id (empty for a LLaVA-Med question file).

    `source` is a LLaVA-Med question file, a dataset path (with `dataset` naming its loader; a
    conversation-format file defaults to ``llava-med``), or a registered dataset name.
    """
    if dataset is None and is_llava_med_question_file(source):
        return read_llava_med_questions(source, image_root), {}
    from tinymed.data.registry import DATASETS, load_dataset

    if dataset is None and not Path(source).exists() and str(source) in DATASETS:
        dataset, source = str(source), None
    samples = load_dataset(dataset or "llava-med", source, split=split).samples
    return [item_from_sample(s) for s in samples], {s.id: s for s in samples}
