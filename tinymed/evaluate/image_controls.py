"""Image controls: evaluate with each question's own image taken away, to measure how much a model reads images.

- `none`: each question is shown its own image.
- `shuffled`: each question is shown another case's image. A *case* is one distinct image of the evaluated
  samples (its path, or the SHA-256 of its bytes when embedded, since one picture may sit in many rows). The
  cases are put in a seeded random order and each is shown the next one's image in that cycle: a derangement,
  so no question ever sees its own image, and all questions about one image see the same other image.
- `blank`: each image is replaced by a uniform RGB (128, 128, 128) image of its size.

`ImagePlan.show` returns the image to show and a record of it (predictions.jsonl `image_shown`, a JSON object
so that the scorer does not break metrics down by it). Importing this module is cheap (the CLI does).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from PIL import Image

    from tinymed.data import MedVQASample

ImageControl = Literal["none", "shuffled", "blank"]
IMAGE_CONTROLS: tuple[str, ...] = get_args(ImageControl)
BLANK_RGB = (128, 128, 128)


def case_key(sample: MedVQASample) -> str:
    """The case a sample's image belongs to: `sha256:<hex>` of embedded bytes, else the image path."""
    if sample.image_bytes is not None:
        return "sha256:" + hashlib.sha256(sample.image_bytes).hexdigest()
    return sample.image


def derangement(keys: Iterable[str], seed: int) -> dict[str, str]:
    """Map each distinct key to another one: the sorted keys, shuffled by `seed`, each mapped to the next in
    that cycle. Deterministic, a bijection, and no key maps to itself; needs at least two distinct keys."""
    order = sorted(set(keys))
    if len(order) < 2:
        raise ValueError(f"the shuffled image control needs at least two distinct images; "
                         f"the evaluated samples have {len(order)}")
    random.Random(seed).shuffle(order)
    return {key: order[(i + 1) % len(order)] for i, key in enumerate(order)}


@dataclass(frozen=True)
class ImagePlan:
    """Which image each sample is shown under one control (`donors`: case → the sample whose image replaces
    that case's, for `shuffled` only)."""

    control: ImageControl
    seed: int | None = None
    donors: dict[str, MedVQASample] = field(default_factory=dict)

    @classmethod
    def build(cls, control: ImageControl, samples: Sequence[MedVQASample], seed: int) -> ImagePlan:
        """The plan for `samples`; `seed` is used (and recorded) by `shuffled` only."""
        if control not in IMAGE_CONTROLS:
            raise ValueError(f"unknown image control {control!r}; choose one of {', '.join(IMAGE_CONTROLS)}")
        if control != "shuffled":
            return cls(control)
        first_of_case: dict[str, MedVQASample] = {}
        for sample in samples:
            first_of_case.setdefault(case_key(sample), sample)
        mapping = derangement(first_of_case, seed)
        return cls(control, seed, {case: first_of_case[other] for case, other in mapping.items()})

    def describe(self) -> dict:
        """What metrics.json and eval_config.json record: {"kind", "seed"} (seed null unless shuffled)."""
        return {"kind": self.control, "seed": self.seed}

    def fingerprint(self) -> list:
        """The control, seed and assignment: two runs may share predictions only when these are equal."""
        return [self.control, self.seed, sorted((case, donor.image) for case, donor in self.donors.items())]

    def show(self, sample: MedVQASample) -> tuple[Image.Image, dict]:
        """The image shown for `sample` and its record; raises DataError when the image to load is unreadable
        (for `blank`, the sample's own image, whose size the blank takes)."""
        from PIL import Image

        if self.control == "shuffled":
            donor = self.donors[case_key(sample)]
            return donor.load_image(), {"control": self.control, "image": donor.image}
        image = sample.load_image()
        if self.control == "blank":
            return Image.new("RGB", image.size, BLANK_RGB), {"control": self.control, "rgb": list(BLANK_RGB),
                                                              "size": list(image.size)}
        return image, {"control": self.control, "image": sample.image}
