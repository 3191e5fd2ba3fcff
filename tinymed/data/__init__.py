"""Data stage: medical VQA datasets in one record type."""

from tinymed.data.sample import AnswerType, DataError, MedVQASample

__all__ = ["AnswerType", "DataError", "MedVQASample"]
