"""VQA-RAD (Lau et al., Scientific Data 2018): radiology VQA, 315 MedPix images.

Two local layouts, both with the images in `images/`:
- split files `trainset.json` / `testset.json` (the split used by MEVF, LLaVA-Med, Med-MoE;
  train 3064, test 451 QA);
- the original release `VQA_RAD Dataset Public.json` (2248 QA): the official test set is the rows
  whose `phrase_type` starts with ``test_`` (451 QA), train is the rest.
`layout="auto"` prefers the split files when present. `path=None` (or the Hub id) loads the Hub copy
(image, question, answer only: its answer_type is inferred, CLOSED for yes/no answers, which
counts 251 of the 272 officially closed test questions).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

from tinymed.data import hub
from tinymed.data.pathvqa import table_result
from tinymed.data.rows import (
    LoadOptions,
    LoadResult,
    collect,
    optional_text,
    parse_answer_type,
    read_json_list,
    text_field,
)
from tinymed.data.sample import DataError, MedVQASample

HUB_ID = "flaviagiammarino/vqa-rad"
ORIGINAL_FILE = "VQA_RAD Dataset Public.json"
SPLIT_FILES = {"train": "trainset.json", "test": "testset.json"}
LAYOUT_HELP = f"DIR holds trainset.json + testset.json (or {ORIGINAL_FILE!r}) and images/"

Layout = Literal["auto", "split-files", "original"]
FrameQuestions = Literal["keep", "rewrite", "drop"]

# Slash choices of the "frame" templates and the word a natural question uses.
FRAME_CHOICES = {"near/in": "in", "present/visualized": "present"}
# Words that end a copula's subject ("Is/Are there air | in the bowels?").
SUBJECT_ENDS = {"in", "on", "of", "at", "near", "within", "with", "to", "from", "along", "around", "between",
                "located", "normal", "present", "seen", "visible", "visualized"}
NOT_PLURAL_ENDINGS = ("ss", "us", "is", "xis")


def load_vqarad(
    path: str | Path | None, split: str, options: LoadOptions, *, layout: Layout = "auto",
    frame_questions: FrameQuestions = "keep",
) -> LoadResult:
    """Load one VQA-RAD split ("train" or "test") from a local folder or the Hub.

    `frame_questions`: what to do with rows whose phrase_type is "frame" (1267 of the 3064 train rows, none
    in test): VQA-RAD's template questions ("Is/Are there ascites?", "... -yes/no"). keep = as released;
    rewrite = in natural wording (`natural_frame_question`), as the test questions are written; drop."""
    if frame_questions not in get_args(FrameQuestions):
        raise DataError(f"frame_questions must be keep, rewrite or drop, not {frame_questions!r}")
    if hub.is_hub_reference(path, HUB_ID):
        return table_result(hub.hub_table("vqa-rad", HUB_ID, split, LAYOUT_HELP), HUB_ID, "vqa-rad", split, options)
    split = split.strip().lower()
    if split not in SPLIT_FILES:
        raise DataError(f"VQA-RAD has no split {split!r}; choose train or test")
    folder = Path(path).resolve()
    images = (options.image_folder or folder / "images").resolve()
    file, rows = _split_rows(folder, split, layout)
    if frame_questions == "drop":
        rows = [(i, r) for i, r in rows if _phrase_type(r) != "frame"]

    def convert(record) -> MedVQASample:
        sample = _to_sample(record, split, images)
        if frame_questions == "rewrite" and _phrase_type(record) == "frame":
            return sample.model_copy(update={"question": natural_frame_question(sample.question)})
        return sample

    samples, skipped = collect(file, rows, convert, options)
    return LoadResult(samples, skipped, source=str(file))


def natural_frame_question(question: str) -> str:
    """A VQA-RAD template question in natural wording: "Is/Are" becomes "Is" or "Are" by its subject's
    number (a plural subject is a word ending in "s", not "ss"/"us"/"is"/"xis", before a preposition),
    "near/in" becomes "in", "present/visualized" "present"; a trailing "-yes/no" or "-open", a doubled
    "there" or "?" and extra spaces go. E.g. "Is/Are the kidneys normal?" → "Are the kidneys normal?"."""
    text = re.sub(r"\s*-\s*(yes/no|open)\s*$", "", question.strip())
    for choices, word in FRAME_CHOICES.items():
        text = re.sub(rf"\b{choices}\b", word, text, flags=re.IGNORECASE)
    text = re.sub(r"\b(is)/are\b", _copula, text, flags=re.IGNORECASE)
    text = re.sub(r"\bthere\s+there\b", "there", text, flags=re.IGNORECASE)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([?.,])", r"\1", text)
    return re.sub(r"\?+", "?", text).strip()


def _copula(match: re.Match) -> str:
    """"is" or "are" (in the case of the matched "Is/Are") for the subject that follows the match."""
    words = re.findall(r"[A-Za-z'-]+", match.string[match.end():].lower())
    subject = []
    for word in words:
        if word in SUBJECT_ENDS:
            break
        if word not in ("there", "the", "any"):
            subject.append(word)
    plural = bool(subject) and subject[0] not in ("a", "an") and any(
        w.endswith("s") and not w.endswith(NOT_PLURAL_ENDINGS) for w in subject)
    verb = "are" if plural else "is"
    return verb.capitalize() if match.group(1)[0].isupper() else verb


def _split_rows(folder: Path, split: str, layout: Layout) -> tuple[Path, list[tuple[int, object]]]:
    """The file to read and its (index, record) rows belonging to `split`."""
    split_file = folder / SPLIT_FILES[split]
    use_split_files = layout == "split-files" or (layout == "auto" and split_file.exists())
    if use_split_files:
        return split_file, read_json_list(split_file)
    original = folder / ORIGINAL_FILE
    if layout == "auto" and not original.exists():
        raise DataError(f"no VQA-RAD files found; expected {LAYOUT_HELP}", file=folder)
    rows = [(i, r) for i, r in read_json_list(original) if _is_test_row(r) == (split == "test")]
    return original, rows


def _is_test_row(record) -> bool:
    """Official test rows of the original release: phrase_type test_freeform / test_para."""
    return _phrase_type(record).startswith("test_")


def _phrase_type(record) -> str:
    """A raw record's phrase_type ("" when it has none or is not an object)."""
    return str(record.get("phrase_type", "") if isinstance(record, dict) else "").strip()


def _to_sample(record, split: str, images: Path) -> MedVQASample:
    answer = text_field(record, "answer")
    question_type = optional_text(record, "question_type")
    return MedVQASample(
        id=text_field(record, "qid"),
        image=str(images / text_field(record, "image_name")),
        question=text_field(record, "question"),
        answer=answer,
        answer_type=parse_answer_type(text_field(record, "answer_type"), answer),
        dataset="vqa-rad",
        split=split,
        question_type=question_type.upper() if question_type else None,
        organ=optional_text(record, "image_organ"),
        language="en",
        extra={k: record[k] for k in ("phrase_type",) if record.get(k) is not None},
    )
