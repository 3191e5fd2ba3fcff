"""The one record every dataset loads into, and the errors loaders raise."""

from __future__ import annotations

import io
from enum import Enum
from pathlib import Path

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from tinymed.data.images import to_model_rgb


class AnswerType(str, Enum):
    """OPEN = free-form answer; CLOSED = yes/no or a choice among given options."""

    OPEN = "OPEN"
    CLOSED = "CLOSED"


class DataError(ValueError):
    """A dataset file, row or image is unusable. The message names the file and the row."""

    def __init__(self, message: str, *, file: str | Path | None = None, row: int | str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if row is not None:
            where.append(f"row {row}")
        self.file = str(file) if file is not None else None
        self.row = row
        super().__init__(f"{message} ({', '.join(where)})" if where else message)


class MedVQASample(BaseModel):
    """One medical VQA question about one image.

    `image` is a path to the image file (absolute, or as the source gives it), or a pseudo-reference
    such as ``file.parquet#row=12`` when the image bytes are embedded (then `image_bytes` holds them).
    """

    model_config = ConfigDict(frozen=False)

    id: str
    image: str
    question: str
    answer: str
    answer_type: AnswerType
    dataset: str
    split: str
    question_type: str | None = None
    modality: str | None = None
    organ: str | None = None
    content_type: str | None = None
    language: str | None = None
    extra: dict = Field(default_factory=dict, description="any other source metadata")
    image_bytes: bytes | None = Field(default=None, exclude=True, repr=False)

    def load_image(self) -> Image.Image:
        """Decode the image as RGB (`to_model_rgb`: EXIF orientation, 16-bit grey rescaled); raises DataError naming the file when missing or unreadable."""
        try:
            if self.image_bytes is not None:
                img = Image.open(io.BytesIO(self.image_bytes))
            else:
                img = Image.open(self.image)
            img.load()
            return to_model_rgb(img)
        except FileNotFoundError as exc:
            raise DataError("image file not found", file=self.image, row=self.id) from exc
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"unreadable image: {exc}", file=self.image, row=self.id) from exc

    def metadata(self) -> dict:
        """The metadata fields that are set (used for score breakdowns and predictions.jsonl)."""
        fields = ("question_type", "modality", "organ", "content_type", "language")
        meta = {k: getattr(self, k) for k in fields if getattr(self, k) is not None}
        meta.update(self.extra)
        return meta
