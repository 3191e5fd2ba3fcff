"""SLAKE 1.0 (Liu et al., ISBI 2021): bilingual (English/Chinese) radiology VQA, 642 images.

Official layout: `train.json`, `validate.json` (the Hub copy calls it `validation.json`), `test.json`
and `imgs/xmlabN/source.jpg`. English only: train 4919, validate 1053, test 1061 QA.
"""

from __future__ import annotations

from pathlib import Path

from tinymed.data import hub
from tinymed.data.rows import (
    LoadOptions,
    LoadResult,
    check_language,
    collect,
    keep_language,
    optional_text,
    parse_answer_type,
    read_json_list,
    split_names,
    text_field,
)
from tinymed.data.sample import DataError, MedVQASample

HUB_ID = "BoKelvin/SLAKE"
LAYOUT_HELP = "DIR holds train.json, validate.json, test.json and imgs/xmlabN/source.jpg"


def load_slake(path: str | Path | None, split: str, options: LoadOptions) -> LoadResult:
    """Load one SLAKE split (train, validate/val/validation, test) in options.language."""
    check_language(options)
    if hub.is_hub_reference(path, HUB_ID):
        folder, images = hub.download_slake("slake", HUB_ID, LAYOUT_HELP)
        options = options.model_copy(update={"image_folder": options.image_folder or images})
        path = folder
    folder = Path(path).resolve()
    file = _split_file(folder, split)
    images = (options.image_folder or folder / "imgs").resolve()

    def convert(record) -> MedVQASample | None:
        language = text_field(record, "q_lang")
        return _to_sample(record, file.stem, images) if keep_language(language, options) else None

    samples, skipped = collect(file, read_json_list(file), convert, options)
    return LoadResult(samples, skipped, source=str(file))


def _split_file(folder: Path, split: str) -> Path:
    candidates = [folder / f"{name}.json" for name in split_names(split)]
    for file in candidates:
        if file.exists():
            return file
    raise DataError(f"no SLAKE split {split!r}; expected {LAYOUT_HELP}", file=candidates[0])


def _to_sample(record: dict, split: str, images: Path) -> MedVQASample:
    answer = text_field(record, "answer")
    return MedVQASample(
        id=text_field(record, "qid"),
        image=str(images / text_field(record, "img_name")),
        question=text_field(record, "question"),
        answer=answer,
        answer_type=parse_answer_type(text_field(record, "answer_type"), answer),
        dataset="slake",
        split=split,
        modality=optional_text(record, "modality"),
        organ=optional_text(record, "location"),
        content_type=optional_text(record, "content_type"),
        language=text_field(record, "q_lang"),
        extra={k: record[k] for k in ("base_type",) if record.get(k) is not None},
    )
