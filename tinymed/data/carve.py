"""Validation parts carved from a split by image, for datasets that ship no usable validation split
(e.g. PathVQA here): `SPLIT:valP` holds the questions about ≈P% of the split's images, `SPLIT:restP` the
questions about all the others, so no image is in both.

An image falls in the `val` part when the SHA-256 of its identity (the file name; the bytes' digest
when the image is embedded in a table) is below P% of the hash range: the carve needs no seed, is the
same on every machine and for any row order, and an image added later does not move the others."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from tinymed.data.rows import LoadResult
from tinymed.data.sample import DataError, MedVQASample

CARVE_SPLIT = re.compile(r"^(?P<split>[A-Za-z0-9_-]+):(?P<part>val|rest)(?P<percent>[1-9][0-9]?)$")
PARTS = ("val", "rest")
BUCKETS = 10_000


def parse_carve(split: str) -> tuple[str, str, int] | None:
    """("train", "val", 10) for "train:val10"; None for a plain split name; DataError for a bad carve."""
    if ":" not in split:
        return None
    match = CARVE_SPLIT.match(split.strip())
    if not match:
        raise DataError(f"bad split {split!r}: a carved split is SPLIT:valP or SPLIT:restP with P a whole "
                        "percentage from 1 to 99, e.g. train:val10 (10% of the images) and train:rest10")
    return match["split"], match["part"], int(match["percent"])


def training_split_for(evaluated: str) -> str:
    """The split that pairs with an evaluated one for training: the other part of a carve
    ("train:val10" → "train:rest10", and back), else "train" (for "test", "validation", ...)."""
    carved = parse_carve(evaluated)
    if carved is None:
        return "train"
    whole, part, percent = carved
    return f"{whole}:{'rest' if part == 'val' else 'val'}{percent}"


def image_identity(sample: MedVQASample) -> str:
    """What makes two rows show the same image: the file name, or the digest of embedded bytes."""
    if sample.image_bytes is not None:
        return "sha256:" + hashlib.sha256(sample.image_bytes).hexdigest()
    return Path(sample.image).name


def in_val_part(identity: str, percent: int) -> bool:
    """True when the image belongs to the `valP` part."""
    digest = hashlib.sha256(identity.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS < percent * BUCKETS // 100


def carve(result: LoadResult, split: str, part: str, percent: int) -> LoadResult:
    """The samples of `result` in `part` ("val" or "rest") of the P% carve, their split renamed `split`."""
    want_val = part == "val"
    kept = [s.model_copy(update={"split": split}) for s in result.samples
            if in_val_part(image_identity(s), percent) == want_val]
    return LoadResult(kept, result.skipped, source=result.source)
