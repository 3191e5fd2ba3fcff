"""The question-only baseline: what a model that never looks at the image can score.

For each test question it answers the most frequent training answer for the same question text
(lower-cased, punctuation and extra spaces removed); for an unseen question text, the most frequent
answer for the same (question_type, answer_type); then for the same answer_type. Ties break by the
answer seen first. If the image-conditioned model does not beat this by a wide margin, it is not
using the image.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from tinymed.data import MedVQASample


def question_key(question: str) -> str:
    """The question's template identity: lower case, letters/digits/spaces only, single spaces."""
    return " ".join(re.sub(r"[^a-z0-9 ]+", " ", question.lower()).split())


class QuestionOnlyBaseline:
    """Most-frequent-answer tables learned from training samples, from the most to the least specific key."""

    def __init__(self, train: Iterable[MedVQASample]):
        self.tables: list[dict] = [{}, {}, {}]
        counters: list[dict[object, Counter]] = [{}, {}, {}]
        for sample in train:
            for table, key in zip(counters, self._keys(sample)):
                table.setdefault(key, Counter())[sample.answer.strip()] += 1
        self.tables = [{k: c.most_common(1)[0][0] for k, c in table.items()} for table in counters]

    @staticmethod
    def _keys(sample: MedVQASample) -> tuple:
        return (
            question_key(sample.question),
            (sample.question_type, sample.answer_type),
            sample.answer_type,
        )

    def predict(self, sample: MedVQASample) -> str:
        """The baseline answer for one test question ("" if training had nothing of its answer type)."""
        for table, key in zip(self.tables, self._keys(sample)):
            if key in table:
                return table[key]
        return ""
