"""PathVQA (He et al., 2020) and any table in the Hugging Face `datasets` layout.

A local folder may hold, per split:
- parquet files named like the Hub's (`data/test-00000-of-00001.parquet`, `test.parquet`,
  or `test/0000.parquet` as in the Hub's parquet export);
- a `save_to_disk` folder (`dataset_dict.json` + one subfolder per split), or `.arrow` files;
- `{split}.json` / `{split}.jsonl` in the conversation format.
Columns: image (dict with bytes and/or path, a PIL image, or a path), question, answer; optional
answer_type (else CLOSED for yes/no answers, OPEN otherwise) and metadata columns.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinymed.data import conversation, hub
from tinymed.data.rows import (
    LoadOptions,
    LoadResult,
    collect,
    optional_text,
    parse_answer_type,
    split_names,
    text_field,
)
from tinymed.data.sample import DataError, MedVQASample

HUB_ID = "flaviagiammarino/path-vqa"
LAYOUT_HELP = (
    "DIR holds each split as Hugging Face parquet files (e.g. data/test-00000-of-00001.parquet), "
    "a save_to_disk folder or .arrow files, or {split}.json in the conversation format"
)
METADATA_COLUMNS = ("question_type", "modality", "organ", "content_type", "language")


def load_pathvqa(path: str | Path | None, split: str, options: LoadOptions) -> LoadResult:
    """Load one PathVQA split (train, validation, test) from a local folder or the Hub."""
    if hub.is_hub_reference(path, HUB_ID):
        return table_result(hub.hub_table("pathvqa", HUB_ID, split, LAYOUT_HELP), HUB_ID, "pathvqa", split, options)
    folder = Path(path).resolve()
    if conversation.find_split_file(folder, split):
        return conversation.load_conversation(folder, split, options, dataset="pathvqa")
    return load_hf_folder(folder, split, options, dataset="pathvqa")


def load_hf_folder(folder: Path, split: str, options: LoadOptions, *, dataset: str) -> LoadResult:
    """Load a split of a local table in the Hugging Face layout (parquet, save_to_disk, arrow)."""
    if (folder / "dataset_dict.json").exists() or (folder / "state.json").exists():
        return table_result(_from_disk(folder, split), str(folder), dataset, split, options)
    files = _split_files(folder, split, ".parquet") or _split_files(folder, split, ".arrow")
    if not files:
        raise DataError(f"no {split!r} split found: {LAYOUT_HELP}", file=folder)
    result = LoadResult([], [], source=str(folder))
    offset = 0
    for file in files:
        remaining = None if options.limit is None else options.limit - len(result.samples)
        if remaining == 0:
            break
        rows, n_rows = _parquet_rows(file) if file.suffix == ".parquet" else _table_rows(_arrow_table(file))
        convert = _converter(str(file), file.parent, dataset, split, offset)
        samples, skipped = collect(file, rows, convert, options.model_copy(update={"limit": remaining}))
        result.samples += samples
        result.skipped += skipped
        offset += n_rows
    return result


def table_result(table, source: str, dataset: str, split: str, options: LoadOptions) -> LoadResult:
    """Samples from an in-memory `datasets.Dataset` (Hub or save_to_disk)."""
    rows, _ = _table_rows(table)
    samples, skipped = collect(source, rows, _converter(source, None, dataset, split, 0), options)
    return LoadResult(samples, skipped, source=source)


def _converter(ref: str, base: Path | None, dataset: str, split: str, offset: int):
    """A row converter; ids are `{split}-{n}`, n counting rows across the split's files."""

    def convert(indexed: tuple[int, dict]) -> MedVQASample:
        row, record = indexed
        return _to_sample(record, f"{ref}#row={row}", base, dataset, split, f"{split}-{offset + row}")

    return convert


def _to_sample(record: Any, ref: str, base: Path | None, dataset: str, split: str, default_id: str) -> MedVQASample:
    answer = text_field(record, "answer")
    image, image_bytes = _image(record.get("image"), ref, base)
    return MedVQASample(
        id=optional_text(record, "id") or default_id,
        image=image,
        image_bytes=image_bytes,
        question=text_field(record, "question"),
        answer=answer,
        answer_type=parse_answer_type(record.get("answer_type"), answer),
        dataset=dataset,
        split=split,
        **{key: optional_text(record, key) for key in METADATA_COLUMNS if key in record},
    )


def _image(value: Any, ref: str, base: Path | None) -> tuple[str, bytes | None]:
    """(image reference, embedded bytes or None) from an image cell in any of its HF forms.

    Image paths are resolved against `base` (the data file's folder) when given.
    """
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes"):
        return ref, value["bytes"]
    path = value.get("path") if isinstance(value, dict) else value
    if isinstance(path, str) and path:
        return str((base / path).resolve()) if base else path, None
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return ref, buffer.getvalue()
    raise DataError(f"column 'image' must hold an image (bytes, path or PIL), got {type(value).__name__}")


def _split_files(folder: Path, split: str, suffix: str) -> list[Path]:
    """Files of `split`: named `{split}.ext`, `{split}-*.ext`, or inside a `{split}/` folder."""
    names = split_names(split)

    def matches(file: Path) -> bool:
        stem = file.name[: -len(suffix)]
        return any(stem == n or stem.startswith(f"{n}-") or file.parent.name == n for n in names)

    return sorted(f for f in folder.rglob(f"*{suffix}") if matches(f))


def _parquet_rows(file: Path) -> tuple[Iterator[tuple[int, tuple[int, dict]]], int]:
    """(row iterator read in batches, row count) of a parquet file."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(file)

    def rows():
        row = 0
        for batch in parquet.iter_batches(batch_size=256):
            for record in batch.to_pylist():
                yield row, (row, record)
                row += 1

    return rows(), parquet.metadata.num_rows


def _table_rows(table) -> tuple[Iterator[tuple[int, tuple[int, dict]]], int]:
    """(row iterator, row count) of a `datasets.Dataset`."""
    return ((row, (row, record)) for row, record in enumerate(table)), len(table)


def _arrow_table(file: Path):
    import datasets

    return _undecoded(datasets.Dataset.from_file(str(file)))


def _from_disk(folder: Path, split: str):
    import datasets

    loaded = datasets.load_from_disk(str(folder))
    if isinstance(loaded, datasets.DatasetDict):
        name = next((n for n in split_names(split) if n in loaded), None)
        if name is None:
            raise DataError(f"no split {split!r}; the folder has {', '.join(loaded)}", file=folder)
        loaded = loaded[name]
    return _undecoded(loaded)


def _undecoded(table):
    """Keep images as {bytes, path} dicts instead of decoding every one to PIL."""
    import datasets

    if isinstance(table.features.get("image"), datasets.Image):
        return table.cast_column("image", datasets.Image(decode=False))
    return table
