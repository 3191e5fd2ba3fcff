"""What every loader shares: options, results, field parsing, and the per-row error/skip/limit loop.

Row numbers in errors: for a JSON list, the 0-based index of the record in the list; for JSONL,
the 1-based line number; for parquet/arrow tables, the 0-based row index in that file.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image
from pydantic import BaseModel

from tinymed.data.sample import AnswerType, DataError, MedVQASample

LANGUAGES = ("en", "zh", "all")
VALIDATION_NAMES = ("validate", "validation", "val", "valid", "dev")

# Answer-type spellings seen in the wild (upper-cased, stripped). "YES/NO" is a closed question.
ANSWER_TYPES = {
    "OPEN": AnswerType.OPEN,
    "CLOSED": AnswerType.CLOSED,
    "CLOSE": AnswerType.CLOSED,
    "YES/NO": AnswerType.CLOSED,
}


@dataclass
class SkippedRow:
    """A row left out with skip_invalid=True, and why."""

    file: str
    row: int | str
    reason: str


@dataclass
class LoadResult:
    """Loaded samples, the rows skipped (only with skip_invalid=True), and where they came from."""

    samples: list[MedVQASample]
    skipped: list[SkippedRow] = field(default_factory=list)
    source: str = ""


class LoadOptions(BaseModel):
    """Options every loader accepts (a loader ignores those that do not apply to its format).

    language: "en", "zh" or "all"; filters rows that carry a language (SLAKE, conversation files).
    limit: keep at most this many samples (after filtering and validation).
    image_folder: look images up here instead of the format's default folder.
    """

    language: str = "en"
    skip_invalid: bool = False
    check_images: bool = False
    limit: int | None = None
    image_folder: Path | None = None


def split_names(split: str) -> tuple[str, ...]:
    """The file names a split may go by: the validation split has several spellings."""
    split = split.strip().lower()
    if split in VALIDATION_NAMES:
        return (split, *(name for name in VALIDATION_NAMES if name != split))
    return (split,)


def text_field(record: Any, key: str) -> str:
    """A required string field (numbers are stringified: VQA-RAD has numeric answers)."""
    if not isinstance(record, dict):
        raise DataError(f"row is a {type(record).__name__}, expected an object")
    if key not in record or record[key] is None:
        raise DataError(f"missing key {key!r}")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"key {key!r} must be text, got {type(value).__name__}")
    return str(value).strip()


def optional_text(record: Any, key: str) -> str | None:
    """An optional string field; None when absent or empty."""
    if isinstance(record, dict) and record.get(key) in (None, ""):
        return None
    return text_field(record, key)


def is_yes_no(answer: str) -> bool:
    return answer.strip().lower() in ("yes", "no")


def parse_answer_type(value: Any, answer: str) -> AnswerType:
    """OPEN/CLOSED from the source's spelling; when absent, CLOSED for yes/no answers, else OPEN."""
    if value is None or value == "":
        return AnswerType.CLOSED if is_yes_no(answer) else AnswerType.OPEN
    if not isinstance(value, str) or value.strip().upper() not in ANSWER_TYPES:
        raise DataError(f"unknown answer type {value!r} (expected OPEN or CLOSED)")
    return ANSWER_TYPES[value.strip().upper()]


def read_json(file: Path) -> Any:
    """Parse a whole JSON file; a missing or invalid file is a DataError naming it."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"invalid JSON: {exc}", file=file) from None


def read_json_list(file: Path) -> list[tuple[int, Any]]:
    """(index, record) for a file holding a JSON list of records."""
    data = read_json(file)
    if not isinstance(data, list):
        raise DataError(f"expected a JSON list of records, got {type(data).__name__}", file=file)
    return list(enumerate(data))


def read_jsonl_lines(file: Path) -> list[tuple[int, str]]:
    """(line number, raw line) for the non-blank lines of a JSONL file (parsed per row later)."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError("file not found", file=file) from None
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


class ImageChecker:
    """Opens and verifies images (PIL verify), remembering each path's verdict."""

    def __init__(self) -> None:
        self._verdicts: dict[str, str | None] = {}

    def problem(self, sample: MedVQASample) -> str | None:
        """None when the image is readable, else what is wrong with it."""
        if sample.image_bytes is not None:
            return _verify(io.BytesIO(sample.image_bytes), sample.image)
        if sample.image not in self._verdicts:
            self._verdicts[sample.image] = _verify(sample.image, sample.image)
        return self._verdicts[sample.image]


def _verify(source, name: str) -> str | None:
    try:
        with Image.open(source) as img:
            img.verify()
    except FileNotFoundError:
        return f"image not found: {name}"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        return f"unreadable image {name}: {exc}"
    return None


def collect(
    file: str | Path,
    rows: Iterable[tuple[int | str, Any]],
    convert: Callable[[Any], MedVQASample | list[MedVQASample] | None],
    options: LoadOptions,
) -> tuple[list[MedVQASample], list[SkippedRow]]:
    """Convert rows to samples. `convert` returns one sample, several (a multi-turn conversation),
    or None for a row filtered out (e.g. another language).

    A row that fails (or whose image fails, with check_images) raises DataError naming file and
    row, or with skip_invalid is recorded in the skipped list. Stops after options.limit samples.
    """
    samples: list[MedVQASample] = []
    skipped: list[SkippedRow] = []
    checker = ImageChecker() if options.check_images else None
    for row, raw in rows:
        if options.limit is not None and len(samples) >= options.limit:
            break
        try:
            produced = convert(raw)
            batch = [] if produced is None else produced if isinstance(produced, list) else [produced]
            problem = next(filter(None, map(checker.problem, batch)), None) if checker else None
            if problem:
                raise DataError(problem)
        except (DataError, KeyError, TypeError, ValueError) as exc:
            reason = exc.args[0] if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"
            if not options.skip_invalid:
                raise DataError(reason, file=file, row=row) from exc
            skipped.append(SkippedRow(file=str(file), row=row, reason=reason))
            continue
        samples.extend(batch)
    if options.limit is not None:
        del samples[options.limit :]
    return samples, skipped


def keep_language(language: str | None, options: LoadOptions) -> bool:
    """Whether a row in `language` passes the language filter (rows without one always pass)."""
    return options.language == "all" or language is None or language == options.language


def check_language(options: LoadOptions) -> None:
    if options.language not in LANGUAGES:
        raise DataError(f"unknown language {options.language!r}; choose one of {', '.join(LANGUAGES)}")
