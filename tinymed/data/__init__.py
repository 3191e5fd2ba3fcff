"""Data stage: medical VQA datasets in one record type."""

from tinymed.data.conversation import write_conversation
from tinymed.data.registry import (
    DATASETS,
    DatasetSpec,
    DatasetStats,
    LoadOptions,
    LoadResult,
    SkippedRow,
    dataset_stats,
    load_dataset,
    load_many,
)
from tinymed.data.sample import AnswerType, DataError, MedVQASample

__all__ = [
    "DATASETS",
    "AnswerType",
    "DataError",
    "DatasetSpec",
    "DatasetStats",
    "LoadOptions",
    "LoadResult",
    "MedVQASample",
    "SkippedRow",
    "dataset_stats",
    "load_dataset",
    "load_many",
    "write_conversation",
]
