"""The dataset registry: one loader per name, and `load_dataset` to call them by name.

Every loader has the signature `(path, split, options: LoadOptions) -> LoadResult`.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tinymed.data.carve import carve, parse_carve
from tinymed.data.conversation import load_conversation
from tinymed.data.pathvqa import load_pathvqa
from tinymed.data.rows import LoadOptions, LoadResult, SkippedRow
from tinymed.data.sample import AnswerType, DataError
from tinymed.data.slake import load_slake
from tinymed.data.vqarad import load_vqarad

__all__ = ["DATASETS", "DatasetSpec", "DatasetStats", "LoadOptions", "LoadResult", "SkippedRow",
           "dataset_stats", "load_dataset", "load_many"]  # fmt: skip


def load_llava_med(path: str | Path | None, split: str, options: LoadOptions) -> LoadResult:
    """A conversation-format file or folder (LLaVA-Med / Med-MoE / TinyLLaVA-Med test files)."""
    if path is None:
        raise DataError("llava-med needs a path: a conversation .json/.jsonl file or a folder with {split}.json")
    return load_conversation(path, split, options, dataset="llava-med")


def load_synthetic(path: str | Path | None, split: str, options: LoadOptions) -> LoadResult:
    """The synthetic dataset folder (`train.json`, `test.json`, `images/`); None = the default one."""
    if path is None:
        from tinymed.data.synthetic import ensure_default_dataset

        path = ensure_default_dataset()
    return load_conversation(path, split, options, dataset="synthetic")


DATASETS: dict[str, Callable[..., LoadResult]] = {
    "vqa-rad": load_vqarad,
    "slake": load_slake,
    "pathvqa": load_pathvqa,
    "llava-med": load_llava_med,
    "synthetic": load_synthetic,
}


def load_dataset(
    name: str,
    path: str | Path | None = None,
    split: str = "test",
    *,
    language: str = "en",
    skip_invalid: bool = False,
    check_images: bool = False,
    limit: int | None = None,
    image_folder: str | Path | None = None,
    **loader_options,
) -> LoadResult:
    """Load one split of a dataset by registry name (see DATASETS and LoadOptions).

    path=None loads the Hub copy (vqa-rad, slake, pathvqa) or the default synthetic dataset.
    A split such as "train:val10" / "train:rest10" is a part carved from a split by image (see `carve`).
    Bad rows raise DataError naming file and row, or with skip_invalid=True land in `skipped`.
    `loader_options` go to the loader itself, e.g. layout="original" for vqa-rad.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    _check_loader_options(name, loader_options)
    carved = parse_carve(split)
    options = LoadOptions(
        language=language,
        skip_invalid=skip_invalid,
        check_images=check_images,
        limit=None if carved else limit,
        image_folder=Path(image_folder) if image_folder else None,
    )
    if carved is None:
        return DATASETS[name](path, split, options, **loader_options)
    whole, part, percent = carved
    result = carve(DATASETS[name](path, whole, options, **loader_options), split, part, percent)
    result.samples = result.samples[:limit]
    return result


def _check_loader_options(name: str, loader_options: dict) -> None:
    accepted = [p.name for p in inspect.signature(DATASETS[name]).parameters.values() if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(loader_options) - set(accepted))
    if unknown:
        raise DataError(f"{name} has no loader option {', '.join(map(repr, unknown))}; "
                        f"it accepts {', '.join(accepted) or 'none'}")


class DatasetSpec(BaseModel):
    """One dataset split to load (e.g. an entry of an evaluation config)."""

    name: str
    path: str | None = None
    split: str = "test"
    language: str = "en"
    loader_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword options of this dataset's loader, e.g. "
                                          '{"frame_questions": "rewrite"} for vqa-rad')


def load_many(specs: Iterable[DatasetSpec], **options) -> list[LoadResult]:
    """Load several dataset splits, in order; `options` are load_dataset's keyword options."""
    return [load_dataset(s.name, s.path, s.split, language=s.language, **options, **s.loader_options)
            for s in specs]


class DatasetStats(BaseModel):
    """Counts of one loaded split: rows, answer types, distinct images, skipped rows, breakdowns."""

    source: str
    n: int
    open: int
    closed: int
    images: int
    skipped: int
    by_question_type: dict[str, int]
    by_modality: dict[str, int]
    by_organ: dict[str, int]
    by_content_type: dict[str, int]


def dataset_stats(result: LoadResult) -> DatasetStats:
    """Summarize a LoadResult; breakdowns count samples per value, most common first."""
    samples = result.samples

    def breakdown(field: str) -> dict[str, int]:
        return dict(Counter(getattr(s, field) for s in samples if getattr(s, field)).most_common())

    closed = sum(s.answer_type == AnswerType.CLOSED for s in samples)
    return DatasetStats(
        source=result.source,
        n=len(samples),
        open=len(samples) - closed,
        closed=closed,
        images=len({s.image for s in samples}),
        skipped=len(result.skipped),
        by_question_type=breakdown("question_type"),
        by_modality=breakdown("modality"),
        by_organ=breakdown("organ"),
        by_content_type=breakdown("content_type"),
    )
