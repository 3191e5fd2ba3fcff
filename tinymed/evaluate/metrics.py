"""Med-VQA metrics: the LLaVA-Med v1 batch scorer reproduced exactly, with strict metrics beside it.

`score_predictions` reproduces the scorer behind the published medical-VQA tables (LLaVA-Med,
Med-MoE, TinyLLaVA-Med): microsoft/LLaVA-Med (v1.0.0), `llava/eval/run_eval_batch.py` `evaluate()`
with `llava/eval/eval_metrics/{evaluate_metrics,utils,glossary}.py`. The reproduction is written
from its algorithm, quirks included:

1. `normalize_llava_med` — punctuation is deleted or turned into a space depending on the *whole
   original string* (any "p " / " p", or any digit-comma-digit anywhere, deletes every p); periods
   not followed by a digit are deleted, but at most 32 of them (the original passes `re.UNICODE`,
   which is 32, as the `count` argument of `re.sub`); its period regex `(?!<=\\d)` is a lookahead,
   not a lookbehind, so "3." loses its period too; number words none..ten become digits; articles
   are dropped; the contractions table's capitalised keys ("Im") never match lower-cased text.
2. The reference and the prediction are lower-cased and normalized once; the F1 and
   exact-match functions normalize their inputs once more (this matters past 32 periods);
   BLEU and the closed check use the once-normalized strings.
3. `f1_llava_med` — true positives add the *candidate's* count of a shared word, so repeated
   words inflate recall ("liver liver liver" vs "left liver": R = 3/4).
4. Open "exact match" = distinct reference words found in the candidate / candidate tokens.
5. Closed accuracy = the normalized reference is a *character substring* of the normalized
   prediction: reference "no" is a hit for "nodule", and "yes and no" hits both "yes" and "no".
6. The published "open" number is the mean recall of item 3 (`open_recall`).

(`run_eval.py` in the same repository differs: it skips, instead of counting as wrong, closed items
whose prediction contains "yes"/"no" without the reference, and its "open accuracy" needs a
candidate-answer file that was never released. Published tables use the batch scorer.)

Strict metrics, reported beside them: exact match after normalization (open and closed), SQuAD-style
bag-of-tokens F1 for open items (shared counts are the minimum of both bags), and closed accuracy by
the first "yes"/"no" token of the prediction (references other than yes/no: exact match).

Records with a non-null `error` are counted in `errors` and scored as empty predictions.
All reported numbers are percentages (0–100), rounded to 4 decimals; a mean over no items is None.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from nltk.translate.bleu_score import sentence_bleu

from tinymed.data.sample import AnswerType

# Contractions of the official VQA evaluation script (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), as used by LLaVA-Med's glossary.py.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip

# Number words of the official VQA evaluation script (its `manualMap`).
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
# Handled in this order (the order matters only for which characters are checked, not the result).
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
               "@", "`", ",", "?", "!")  # fmt: skip
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_PERIOD_CAP = 32  # the original passes re.UNICODE (== 32) as re.sub's `count`
_YES_NO = ("yes", "no")
# Keys that are the item itself, not a way to group items.
_NON_GROUPING_KEYS = frozenset({"id", "image", "question", "answer", "prediction", "error", "answer_type"})
REQUIRED_KEYS = ("id", "answer", "answer_type", "prediction")

OPEN_LLAVA_MED = ("open_recall", "open_precision", "open_f1", "open_exact_match",
                  "open_bleu1", "open_bleu2", "open_bleu3", "open_substring_hit")  # fmt: skip
CLOSED_LLAVA_MED = ("closed_accuracy",)
OPEN_STRICT = ("open_exact_match", "open_token_f1")
CLOSED_STRICT = ("closed_exact_match", "closed_yes_no_accuracy")
GROUP_LLAVA_MED = ("open_recall", "closed_accuracy")


class PredictionsError(ValueError):
    """A predictions record or line is unusable; the message says which and why."""


def normalize_llava_med(text: str) -> str:
    """LLaVA-Med v1 / VQA answer normalization (quirks: see the module docstring, item 1)."""
    spaced = _strip_punctuation(text)
    without_periods = _PERIOD_NOT_BEFORE_DIGIT.sub("", spaced, count=_PERIOD_CAP)
    words = [NUMBER_WORDS.get(word, word) for word in without_periods.lower().split()]
    words = [CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES]
    return " ".join(words).replace(",", "")


def _strip_punctuation(text: str) -> str:
    """Delete each punctuation mark if the original text has it beside a space (or has any
    digit-comma-digit); otherwise replace it with a space."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        beside_space = f"{mark} " in text or f" {mark}" in text
        result = result.replace(mark, "" if delete_all or beside_space else " ")
    return result


def _bag(text: str) -> Counter[str]:
    return Counter(text.lower().split())


def f1_llava_med(candidate: str, reference: str) -> tuple[float, float, float]:
    """(F1, precision, recall) in 0–1, as LLaVA-Med v1: both normalized here; a shared word adds the
    candidate's count to the true positives (repeated words inflate recall); (0, 0, 0) when either
    bag is empty or nothing is shared."""
    cand, ref = _bag(normalize_llava_med(candidate)), _bag(normalize_llava_med(reference))
    true_pos = sum(count for word, count in cand.items() if word in ref)
    false_pos = sum(count for word, count in cand.items() if word not in ref)
    false_neg = sum(count for word, count in ref.items() if word not in cand)
    if not cand or not ref or true_pos == 0:
        return 0.0, 0.0, 0.0
    precision = true_pos / (true_pos + false_pos)
    recall = true_pos / (true_pos + false_neg)
    return 2 * precision * recall / (precision + recall), precision, recall


def exact_match_llava_med(candidate: str, reference: str) -> float:
    """LLaVA-Med v1 "exact match" in 0–1: distinct reference words present in the candidate divided
    by the candidate's token count (both normalized here); 0 for an empty candidate."""
    cand, ref = _bag(normalize_llava_med(candidate)), _bag(normalize_llava_med(reference))
    total = sum(cand.values())
    return sum(1 for word in ref if word in cand) / total if total else 0.0


def bleu_llava_med(candidate: str, reference: str, n: int) -> float:
    """nltk sentence BLEU in 0–1 with only the n-gram precision weighted (weights one-hot at n),
    whitespace tokens, no smoothing — as LLaVA-Med v1's bleu_score_1/2/3."""
    weights = tuple(1 if i == n - 1 else 0 for i in range(4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns on zero higher-order overlaps
        return float(sentence_bleu([reference.split()], candidate.split(), weights=weights))


def token_f1(candidate: str, reference: str) -> float:
    """SQuAD-style bag-of-tokens F1 in 0–1 on whitespace tokens (shared = min of both counts);
    two empty strings score 1, one empty string 0."""
    cand, ref = Counter(candidate.split()), Counter(reference.split())
    if not cand or not ref:
        return float(cand == ref)
    shared = sum((cand & ref).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / sum(cand.values()), shared / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def first_yes_no(text: str) -> str | None:
    """The first whitespace token of `text` that is exactly "yes" or "no", else None."""
    return next((word for word in text.split() if word in _YES_NO), None)


def _closed_strict_hit(prediction: str, reference: str) -> bool:
    if reference in _YES_NO:
        return first_yes_no(prediction) == reference
    return prediction == reference


@dataclass(frozen=True)
class ItemScore:
    """One record's per-item scores in 0–1 (only the keys of its answer type) and its groups."""

    is_open: bool
    llava_med: dict[str, float]
    strict: dict[str, float]
    groups: dict[str, str] = field(default_factory=dict)


def score_item(prediction: str, reference: str, answer_type: AnswerType) -> ItemScore:
    """Score one answer; both strings raw (lower-casing and normalizing happen here)."""
    pred, ref = normalize_llava_med(prediction.lower()), normalize_llava_med(reference.lower())
    if answer_type is AnswerType.CLOSED:
        return ItemScore(
            is_open=False,
            llava_med={"closed_accuracy": float(ref in pred)},
            strict={"closed_exact_match": float(pred == ref),
                    "closed_yes_no_accuracy": float(_closed_strict_hit(pred, ref))},
        )  # fmt: skip
    f1, precision, recall = f1_llava_med(pred, ref)
    llava_med = {
        "open_recall": recall, "open_precision": precision, "open_f1": f1,
        "open_exact_match": exact_match_llava_med(pred, ref),
        **{f"open_bleu{n}": bleu_llava_med(pred, ref, n) for n in (1, 2, 3)},
        "open_substring_hit": float(ref in pred),
    }  # fmt: skip
    strict = {"open_exact_match": float(pred == ref), "open_token_f1": token_f1(pred, ref)}
    return ItemScore(is_open=True, llava_med=llava_med, strict=strict)


def validate_record(record: object) -> None:
    """Raise PredictionsError when `record` lacks a required key or has an unknown answer_type."""
    if not isinstance(record, dict):
        raise PredictionsError(f"expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_KEYS if key not in record]
    if missing:
        raise PredictionsError(f"missing required key(s) {', '.join(missing)}")
    if str(record["answer_type"]).upper() not in AnswerType.__members__:
        raise PredictionsError(f"answer_type must be OPEN or CLOSED, got {record['answer_type']!r}")


def _groups(record: dict) -> dict[str, str]:
    """Grouping fields of a record: answer_type first, then every other string metadata key."""
    groups = {"answer_type": str(record["answer_type"]).upper()}
    for key, value in record.items():
        if key not in _NON_GROUPING_KEYS and isinstance(value, str):
            groups[key] = value
    return groups


def _score_record(record: dict) -> ItemScore:
    failed = record.get("error") is not None
    prediction = "" if failed or record["prediction"] is None else str(record["prediction"])
    answer_type = AnswerType(str(record["answer_type"]).upper())
    item = score_item(prediction, str(record["answer"]), answer_type)
    return replace(item, groups=_groups(record))


def _mean_percent(values: list[float]) -> float | None:
    return round(100 * math.fsum(values) / len(values), 4) if values else None


def _means(items: list[ItemScore], part: str, keys: Iterable[str]) -> dict[str, float | None]:
    return {key: _mean_percent([getattr(item, part)[key] for item in items
                                if key in getattr(item, part)]) for key in keys}  # fmt: skip


def _counts(items: list[ItemScore]) -> dict[str, int]:
    n_open = sum(item.is_open for item in items)
    return {"n": len(items), "n_open": n_open, "n_closed": len(items) - n_open}


def _group_summary(items: list[ItemScore]) -> dict:
    return {**_counts(items),
            "llava_med": _means(items, "llava_med", GROUP_LLAVA_MED),
            "strict": _means(items, "strict", OPEN_STRICT + CLOSED_STRICT)}  # fmt: skip


def _breakdowns(items: list[ItemScore]) -> dict[str, dict[str, dict]]:
    by: dict[str, dict[str, list[ItemScore]]] = {}
    for item in items:
        for name, value in item.groups.items():
            by.setdefault(name, {}).setdefault(value, []).append(item)
    return {name: {value: _group_summary(members) for value, members in sorted(values.items())}
            for name, values in by.items()}  # fmt: skip


def score_predictions(records: Iterable[dict]) -> dict:
    """Score predictions.jsonl rows; returns the `tinymed score --json` / metrics.json object:
    {n, n_open, n_closed, errors, llava_med{...}, strict{...}, by{field: {value: group}}}, 0–100.

    Rows with a non-null `error` count in `errors` and are scored as empty predictions.
    Raises PredictionsError naming the record (index and id) when one is unusable.
    """
    items, errors = [], 0
    for index, record in enumerate(records):
        try:
            validate_record(record)
        except PredictionsError as exc:
            ident = record.get("id") if isinstance(record, dict) else None
            raise PredictionsError(f"record {index} (id {ident!r}): {exc}") from None
        errors += record.get("error") is not None
        items.append(_score_record(record))
    return {**_counts(items), "errors": errors,
            "llava_med": _means(items, "llava_med", OPEN_LLAVA_MED + CLOSED_LLAVA_MED),
            "strict": _means(items, "strict", OPEN_STRICT + CLOSED_STRICT),
            "by": _breakdowns(items)}  # fmt: skip


def read_predictions(path: str | Path) -> list[dict]:
    """Read a predictions.jsonl file (blank lines skipped); raises PredictionsError naming the file
    and line of a malformed line, a missing required key or an unknown answer_type."""
    records = []
    for line_number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            validate_record(record)
        except (json.JSONDecodeError, PredictionsError) as exc:
            reason = f"malformed JSON ({exc.msg})" if isinstance(exc, json.JSONDecodeError) else exc
            raise PredictionsError(f"{path}, line {line_number}: {reason}") from None
        records.append(record)
    return records
