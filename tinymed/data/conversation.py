"""The conversation format of LLaVA-Med, Med-MoE and TinyLLaVA-Med test files (also our export and
synthetic format): a JSON list (or JSONL) of

    {"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
                                      {"from": "gpt", "value": "A"}],
     "answer_type": "OPEN" | "CLOSED", ...metadata}

What real files contain, and how it is read:
- `<image>` tags in the question are removed with the whitespace around them.
- answer_type in any case; "yes/no" and "close" mean CLOSED. When absent: CLOSED for yes/no
  answers, OPEN otherwise.
- a turn without `from` takes human/gpt by alternation (first turn human); "user"/"assistant"
  are accepted too. Each human turn followed by a gpt turn is one sample (ids get `#k` when a
  record holds several pairs).
- top-level question_type, modality, organ, content_type, language, dataset, split fill those
  fields; other scalar keys go to `extra`; anything else is ignored.
- `image` is relative to `image_folder` when given, else to the file's folder, else to its
  `images/` subfolder (per image, the first where the file exists).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tinymed.data.rows import (
    LoadOptions,
    LoadResult,
    collect,
    keep_language,
    optional_text,
    parse_answer_type,
    read_json_list,
    read_jsonl_lines,
    split_names,
    text_field,
)
from tinymed.data.sample import DataError, MedVQASample
from tinymed.io import write_json_atomic, write_jsonl_atomic

CORE_KEYS = ("id", "image", "conversations", "answer_type")
METADATA_FIELDS = ("question_type", "modality", "organ", "content_type", "language")
ROLES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}
IMAGE_TAG = re.compile(r"\s*<image>\s*")
LAYOUT_HELP = "a .json/.jsonl file in the conversation format, or a folder holding {split}.json or {split}.jsonl"


def find_split_file(folder: Path, split: str) -> Path | None:
    """`{split}.json` or `{split}.jsonl` in `folder` (validation under any of its names)."""
    for name in split_names(split):
        for suffix in (".json", ".jsonl"):
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def load_conversation(
    path: str | Path, split: str, options: LoadOptions, *, dataset: str = "llava-med"
) -> LoadResult:
    """Load a conversation-format file (or a folder's `{split}` file); `dataset` names records
    that do not carry their own `dataset` key."""
    file = _resolve_file(Path(path).resolve(), split)
    resolve_image = _image_resolver(file, options.image_folder)
    jsonl = file.suffix == ".jsonl"

    def convert(raw: Any) -> list[MedVQASample] | None:
        record = json.loads(raw) if jsonl else raw
        if not keep_language(optional_text(record, "language"), options):
            return None
        return _to_samples(record, resolve_image, dataset, split)

    rows = read_jsonl_lines(file) if jsonl else read_json_list(file)
    samples, skipped = collect(file, rows, convert, options)
    return LoadResult(samples, skipped, source=str(file))


def _resolve_file(path: Path, split: str) -> Path:
    if path.is_dir():
        file = find_split_file(path, split)
        if file is None:
            raise DataError(f"no {split!r} split found; expected {LAYOUT_HELP}", file=path)
        return file
    if not path.exists():
        raise DataError(f"file not found; expected {LAYOUT_HELP}", file=path)
    return path


def _image_resolver(file: Path, image_folder: Path | None) -> Callable[[str], str]:
    roots = [Path(image_folder).resolve()] if image_folder else [file.parent, file.parent / "images"]
    resolved: dict[str, str] = {}

    def resolve(name: str) -> str:
        if name not in resolved:
            candidates = [root / name for root in roots]  # an absolute name stays as it is
            resolved[name] = str(next((c for c in candidates if c.exists()), candidates[0]))
        return resolved[name]

    return resolve


def _to_samples(record: Any, resolve_image: Callable[[str], str], dataset: str, split: str) -> list[MedVQASample]:
    image = resolve_image(text_field(record, "image"))
    pairs = _qa_pairs(record.get("conversations"))
    record_id = optional_text(record, "id") or optional_text(record, "question_id")
    if record_id is None:
        raise DataError("missing key 'id'")
    metadata = {key: optional_text(record, key) for key in METADATA_FIELDS}
    extra = {
        key: value
        for key, value in record.items()
        if key not in (*CORE_KEYS, *METADATA_FIELDS, "dataset", "split")
        and isinstance(value, str | int | float | bool)
    }
    return [
        MedVQASample(
            id=record_id if len(pairs) == 1 else f"{record_id}#{k}",
            image=image,
            question=question,
            answer=answer,
            answer_type=parse_answer_type(record.get("answer_type"), answer),
            dataset=optional_text(record, "dataset") or dataset,
            split=optional_text(record, "split") or split,
            extra=extra,
            **metadata,
        )
        for k, (question, answer) in enumerate(pairs)
    ]


def _qa_pairs(conversations: Any) -> list[tuple[str, str]]:
    """(question, answer) for each human turn followed by a gpt turn."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list of turns")
    turns = [_turn(turn, i) for i, turn in enumerate(conversations)]
    pairs = [
        (IMAGE_TAG.sub(" ", q_text).strip(), a_text)
        for (q_role, q_text), (a_role, a_text) in zip(turns, turns[1:])
        if q_role == "human" and a_role == "gpt"
    ]
    if not pairs:
        raise DataError("'conversations' holds no human turn followed by a gpt turn")
    return pairs


def _turn(turn: Any, index: int) -> tuple[str, str]:
    """(role, text) of one turn; a missing `from` alternates human, gpt, human, ..."""
    text = text_field(turn, "value")
    role = turn.get("from")
    if role is None:
        return ("human" if index % 2 == 0 else "gpt"), text
    if str(role).lower() not in ROLES:
        raise DataError(f"conversation turn {index} has unknown role {role!r} (expected human or gpt)")
    return ROLES[str(role).lower()], text


def write_conversation(
    samples: Iterable[MedVQASample], out_file: str | Path, image_root: str | Path | None = None
) -> Path:
    """Write samples in the conversation format (JSON list, or JSONL for a .jsonl name), atomically.

    Image paths are written relative to `image_root` (default: the output file's folder) when the
    image lies under it, else absolute. Embedded image bytes are written as PNG files (named by
    content hash) in `{out_file stem}_images/` beside the output. Metadata become top-level keys.
    """
    out_file = Path(out_file).resolve()
    root = Path(image_root).resolve() if image_root else out_file.parent
    images_dir = out_file.parent / f"{out_file.stem}_images"
    records = [_record(sample, _image_path(sample, images_dir), root) for sample in samples]
    write = write_jsonl_atomic if out_file.suffix == ".jsonl" else write_json_atomic
    return write(out_file, records)


def _record(sample: MedVQASample, image: Path, root: Path) -> dict:
    core = {
        "id": sample.id,
        "image": str(image.relative_to(root)) if image.is_relative_to(root) else str(image),
        "conversations": [
            {"from": "human", "value": f"<image>\n{sample.question}"},
            {"from": "gpt", "value": sample.answer},
        ],
        "answer_type": sample.answer_type.value,
        "dataset": sample.dataset,
        "split": sample.split,
    }
    return {**core, **{k: v for k, v in sample.metadata().items() if k not in core}}


def _image_path(sample: MedVQASample, images_dir: Path) -> Path:
    """The sample's image file; embedded bytes are first saved as a PNG there."""
    if sample.image_bytes is None:
        return Path(sample.image).resolve()
    target = images_dir / f"{hashlib.sha1(sample.image_bytes).hexdigest()[:20]}.png"
    if not target.exists():
        buffer = io.BytesIO()
        sample.load_image().save(buffer, format="PNG")
        images_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, target)
    return target
