"""Deterministic synthetic medical VQA: procedural X-ray, CT, MRI and histology images with known
ground truth, and VQA-RAD-style questions whose answers need the image.

Conventions
- Sizes: `n_train` / `n_test` count questions (rows, like every other dataset's size); an image
  carries `questions_per_image` of them on average, so images ≈ questions / questions_per_image.
- Coordinates: x, y in [-1, 1] over the image, x towards the image's right, y downwards.
- Laterality: answers "left"/"right" name the PATIENT's side in the radiological display convention,
  so the patient's left appears on the image's right (x > 0). Laterality is only asked of X-ray, and
  of CT/MRI in the axial or coronal plane (a sagittal slice has no left/right); never of histology.
- Balance: for every closed question string the answer is "yes"/"no" (or either offered option)
  with probability 1/2: the asked-about value is the true one with probability 1/2, otherwise another
  value drawn uniformly, and each asked-about attribute is uniform over its values among the images
  the question applies to (presence too: half the images have no lesion). Whether a question is asked
  is decided per image and kind independently of its answer, so the question alone predicts nothing.
- Emphasis: `SynthConfig.train_emphasis` re-weights question kinds in the train split only (a
  curriculum); the test split is drawn from its own random streams with the default weights.
- Determinism: image j of a split draws from `numpy.random.default_rng([seed, split, j, stream])`, so
  the same config gives byte-identical JSON and PNG files.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field, field_validator

from tinymed.io import write_json_atomic

GENERATOR_VERSION = 2
SPLITS = ("train", "test")
MODALITIES = ("x-ray", "ct", "mri", "histology")
ORGANS = ("brain", "chest", "abdomen")
PLANES = ("axial", "coronal", "sagittal")
SIDES = ("left", "right")  # the patient's side; patient's left = image right (x > 0)
SIZES = ("small", "large")
STAIN_COLORS = ("pink", "brown")  # H&E, DAB immunohistochemistry
COUNTS = ("0", "1", "2", "3")
YES_NO = ("yes", "no")
FINDING = {"brain": "mass", "chest": "nodule", "abdomen": "mass", None: "tumor"}
LESION_RADIUS = {"small": (0.10, 0.12), "large": (0.19, 0.23)}  # in half-image units (1 = 64 px at 128)


class SynthConfig(BaseModel):
    """What to generate. Sizes count questions (rows); images follow from questions_per_image."""

    n_train: int = Field(4800, ge=1, description="questions (rows) in the train split")
    n_test: int = Field(800, ge=1, description="questions (rows) in the test split")
    seed: int = 0
    image_size: int = Field(128, ge=32, le=1024, description="square PNG side in pixels")
    questions_per_image: float = Field(4.0, ge=1.0, le=8.0, description="mean questions per image")
    train_emphasis: dict[str, float] = Field(
        default_factory=dict,
        description="question-kind name → multiplier of its weight in the TRAIN split only (the test split "
                    "is the same bytes whatever this says)")
    train_paired: bool = Field(
        False, description="TRAIN split only: a value-verification question ('Is this the chest?') is asked of its "
                           "image twice, with the true value (yes) and with another one (no)")

    @field_validator("train_emphasis")
    @classmethod
    def _known_kinds(cls, emphasis: dict[str, float]) -> dict[str, float]:
        names = {kind.name for kind in KINDS}
        for name, factor in emphasis.items():
            if name not in names:
                raise ValueError(f"train_emphasis: unknown question kind {name!r} (known: {', '.join(sorted(names))})")
            if not factor > 0:
                raise ValueError(f"train_emphasis[{name!r}] must be > 0, got {factor}")
        return emphasis


def parse_emphasis(items: Iterable[str]) -> dict[str, float]:
    """`train_emphasis` from "KIND=FACTOR" strings (as `--emphasis` takes them); ValueError names a malformed one."""
    emphasis = {}
    for item in items:
        kind, _, factor = item.partition("=")
        try:
            emphasis[kind.strip()] = float(factor)
        except ValueError:
            raise ValueError(f"emphasis {item!r} is not KIND=FACTOR (e.g. organ_yesno=3)") from None
    return emphasis


@dataclass(frozen=True)
class SynthResult:
    """Where the set was written and how big each split is."""

    out_dir: Path
    n_train_questions: int
    n_test_questions: int
    n_train_images: int
    n_test_images: int


# ----------------------------------------------------------------------------------------------
# Scenes: the ground truth of one image


@dataclass(frozen=True)
class Lesion:
    """A round finding; x, y, r in half-image units (see module conventions)."""

    x: float
    y: float
    r: float
    size: str

    @property
    def side(self) -> str:
        """The patient's side (patient's left is on the image's right)."""
        return "left" if self.x > 0 else "right"


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. organ is None for histology; plane only for CT and MRI."""

    modality: str
    organ: str | None
    plane: str | None
    stain_color: str | None
    lesions: tuple[Lesion, ...]

    @property
    def view(self) -> str:
        return _view(self.plane)

    @property
    def lateral(self) -> bool:
        """Whether left/right is defined for this image."""
        return self.modality != "histology" and self.plane != "sagittal"


def _view(plane: str | None) -> str:
    """Which anatomy drawing applies: the plane, or "frontal" for a radiograph."""
    return plane or "frontal"


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draw a scene: modality, organ, plane and stain uniform where they apply; no lesion with
    probability 1/2, else 1-3 lesions uniformly; one lesion: side and size uniform; two lesions:
    one on each side, one small and one large."""
    modality = _pick(rng, MODALITIES)
    organ = None if modality == "histology" else _pick(rng, ORGANS)
    plane = _pick(rng, PLANES) if modality in ("ct", "mri") else None
    stain = _pick(rng, STAIN_COLORS) if modality == "histology" else None
    count = 0 if rng.random() < 0.5 else int(rng.integers(1, 4))
    zone = HISTOLOGY_ZONE if organ is None else ANATOMY[(organ, _view(plane))].body
    return Scene(modality, organ, plane, stain, _place_lesions(rng, count, zone))


def _lesion_layout(rng: np.random.Generator, count: int) -> list[tuple[str, str]]:
    """(side, size) per lesion."""
    if count == 2:
        sizes = list(SIZES) if rng.random() < 0.5 else list(reversed(SIZES))
        return list(zip(SIDES, sizes))
    return [(_pick(rng, SIDES), _pick(rng, SIZES)) for _ in range(count)]


def _place_lesions(rng: np.random.Generator, count: int, zone: tuple[float, ...]) -> tuple[Lesion, ...]:
    """Non-overlapping lesions inside the zone ellipse (cx, cy, rx, ry), each mostly on its side."""
    while True:
        placed: list[Lesion] = []
        for side, size in _lesion_layout(rng, count):
            lesion = _place_one(rng, side, size, zone, placed)
            if lesion is None:
                break
            placed.append(lesion)
        else:
            return tuple(placed)


def _place_one(rng, side, size, zone, placed) -> Lesion | None:
    cx, cy, rx, ry = zone
    r = float(rng.uniform(*LESION_RADIUS[size]))
    sign = 1.0 if side == "left" else -1.0
    for _ in range(100):
        x = sign * float(rng.uniform(0.5 * r + 0.05, rx))
        y = float(rng.uniform(cy - ry, cy + ry))
        inside = ((x - cx) / (0.85 * rx - r)) ** 2 + ((y - cy) / (0.85 * ry - r)) ** 2 <= 1.0
        apart = all(np.hypot(x - o.x, y - o.y) >= r + o.r + 0.06 for o in placed)
        if inside and apart:
            return Lesion(x, y, r, size)
    return None


# ----------------------------------------------------------------------------------------------
# Rendering

# ("ellipse", cx, cy, rx, ry) | ("ring", cx, cy, rx, ry, thickness) | ("arc", same: the ring's upper half)
# | ("bar", cx, cy, half_width, half_height); half-image units
Shape = tuple


@dataclass(frozen=True)
class Anatomy:
    """Body ellipse (cx, cy, rx, ry) plus parts painted in order as (shape, tissue, opacity)."""

    body: tuple[float, float, float, float]
    parts: tuple[tuple[Shape, str, float], ...] = ()


def _pair(cx, cy, rx, ry, tissue):
    """The same ellipse mirrored on both sides of the midline."""
    return (("ellipse", -cx, cy, rx, ry), tissue, 1.0), (("ellipse", cx, cy, rx, ry), tissue, 1.0)


def _ribs():
    return tuple((("arc", 0.0, -0.62 + 0.24 * k, 0.74, 0.28, 0.04), "bone", 0.5) for k in range(6))


ANATOMY: dict[tuple[str, str], Anatomy] = {
    ("brain", "axial"): Anatomy((0, 0, 0.66, 0.84), (
        (("ring", 0, 0, 0.70, 0.88, 0.06), "bone", 1.0), *_pair(0.13, -0.05, 0.07, 0.26, "fluid"))),
    ("brain", "coronal"): Anatomy((0, -0.12, 0.68, 0.68), (
        (("ellipse", 0, 0.8, 0.3, 0.35), "soft", 1.0), (("ring", 0, -0.12, 0.72, 0.72, 0.06), "bone", 1.0),
        *_pair(0.12, -0.15, 0.08, 0.16, "fluid"))),
    ("brain", "sagittal"): Anatomy((0, -0.05, 0.80, 0.62), (
        (("ellipse", 0.15, 0.7, 0.18, 0.35), "soft", 1.0), (("ring", 0, -0.05, 0.84, 0.66, 0.06), "bone", 1.0),
        (("ellipse", 0, -0.1, 0.32, 0.09), "fluid", 1.0), (("ellipse", 0.45, 0.32, 0.22, 0.14), "organ", 1.0))),
    ("brain", "frontal"): Anatomy((0, -0.12, 0.68, 0.68), (
        (("ellipse", 0, 0.8, 0.3, 0.35), "soft", 1.0), (("ring", 0, -0.12, 0.72, 0.72, 0.08), "bone", 1.0),
        *_pair(0.28, 0.15, 0.14, 0.11, "air"))),
    ("chest", "axial"): Anatomy((0, 0, 0.88, 0.60), (
        (("ring", 0, 0, 0.86, 0.58, 0.04), "bone", 1.0), *_pair(0.42, -0.04, 0.32, 0.44, "air"),
        (("ellipse", 0.14, 0.08, 0.26, 0.24), "organ", 1.0), (("ellipse", 0, 0.46, 0.1, 0.1), "bone", 1.0))),
    ("chest", "coronal"): Anatomy((0, 0.05, 0.80, 0.92), (
        *_pair(0.40, -0.12, 0.28, 0.60, "air"), (("ellipse", 0.14, 0.28, 0.27, 0.24), "organ", 1.0),
        (("bar", 0, 0.05, 0.06, 0.9), "bone", 1.0))),
    ("chest", "frontal"): Anatomy((0, 0.05, 0.80, 0.92), (
        *_pair(0.40, -0.12, 0.28, 0.60, "air"), (("ellipse", 0.14, 0.28, 0.27, 0.24), "organ", 1.0),
        (("bar", 0, 0.05, 0.05, 0.9), "bone", 0.6), *_ribs(),
        (("bar", -0.35, -0.78, 0.3, 0.03), "bone", 0.8), (("bar", 0.35, -0.78, 0.3, 0.03), "bone", 0.8))),
    ("chest", "sagittal"): Anatomy((0, 0, 0.62, 0.92), (
        (("ellipse", -0.02, -0.1, 0.42, 0.66), "air", 1.0), (("ellipse", -0.22, 0.25, 0.28, 0.26), "organ", 1.0),
        (("bar", 0.5, 0, 0.07, 0.9), "bone", 1.0))),
    ("abdomen", "axial"): Anatomy((0, 0, 0.88, 0.62), (
        (("ellipse", -0.38, -0.1, 0.4, 0.36), "organ", 1.0), (("ellipse", 0, 0.42, 0.12, 0.12), "bone", 1.0),
        *_pair(0.36, 0.28, 0.12, 0.16, "organ"), (("ellipse", 0.25, -0.3, 0.08, 0.06), "air", 1.0),
        (("ellipse", 0.05, -0.35, 0.06, 0.05), "air", 1.0))),
    ("abdomen", "coronal"): Anatomy((0, 0, 0.80, 0.92), (
        (("ellipse", -0.4, -0.5, 0.36, 0.3), "organ", 1.0), *_pair(0.32, 0.0, 0.12, 0.22, "organ"),
        (("bar", 0, 0, 0.07, 0.9), "bone", 1.0), (("ring", 0, 0.85, 0.6, 0.3, 0.06), "bone", 1.0),
        (("ellipse", 0.3, -0.2, 0.1, 0.07), "air", 1.0))),
    ("abdomen", "sagittal"): Anatomy((0, 0, 0.58, 0.92), (
        (("ellipse", -0.1, -0.55, 0.4, 0.3), "organ", 1.0), (("bar", 0.45, 0.05, 0.08, 0.9), "bone", 1.0),
        (("ellipse", 0.2, 0.05, 0.12, 0.22), "organ", 1.0), (("ellipse", -0.3, 0.2, 0.1, 0.08), "air", 1.0))),
}
ANATOMY[("abdomen", "frontal")] = ANATOMY[("abdomen", "coronal")]
HISTOLOGY_ZONE = (0.0, 0.0, 0.95, 0.95)


@dataclass(frozen=True)
class RadiologyStyle:
    """Grey levels (0-1) per tissue and the look of one modality (blur/noise in px at 128 px)."""

    tissue: dict[str, float]
    blur: float
    noise: float
    texture: float
    bias_field: bool = False
    table: bool = False


# Lesions are the brightest thing in every radiology image (1.0; bone and fluid stay <= 0.85).
STYLES = {
    "x-ray": RadiologyStyle(
        {"bg": 0.03, "fat": 0.30, "soft": 0.36, "organ": 0.42, "air": 0.12, "fluid": 0.36, "bone": 0.80},
        blur=1.6, noise=0.01, texture=0.05),
    "ct": RadiologyStyle(
        {"bg": 0.0, "fat": 0.22, "soft": 0.50, "organ": 0.60, "air": 0.03, "fluid": 0.30, "bone": 0.82},
        blur=0.4, noise=0.03, texture=0.03, table=True),
    "mri": RadiologyStyle(
        {"bg": 0.04, "fat": 0.78, "soft": 0.40, "organ": 0.28, "air": 0.02, "fluid": 0.80, "bone": 0.08},
        blur=1.2, noise=0.015, texture=0.06, bias_field=True),
}
HISTOLOGY_PALETTES = {  # RGB 0-1: stroma, lumen, normal nuclei, nest fill, tumour nuclei
    "pink": {"stroma": (0.93, 0.66, 0.80), "lumen": (0.98, 0.95, 0.97), "nucleus": (0.58, 0.42, 0.72),
             "nest": (0.62, 0.38, 0.66), "tumour": (0.26, 0.10, 0.36)},
    "brown": {"stroma": (0.93, 0.91, 0.94), "lumen": (0.99, 0.99, 0.99), "nucleus": (0.58, 0.66, 0.86),
              "nest": (0.72, 0.52, 0.34), "tumour": (0.40, 0.21, 0.07)},
}


class _Canvas:
    """Pixel-centre coordinates in half-image units; paints anti-aliased shapes in place, computing
    each shape only inside its bounding box."""

    def __init__(self, size: int):
        self.size = size
        self.px = size / 2.0  # pixels per unit
        self.axis = ((np.arange(size) + 0.5) / self.px - 1.0).astype(np.float32)

    def paint(self, image: np.ndarray, shape: Shape, value, opacity: float = 1.0, edge_px: float = 1.0) -> None:
        """Blend `value` (grey level or RGB) into `image` over `shape`, its edge ramping over `edge_px`."""
        rows, cols, coverage = self.coverage(shape, edge_px)
        alpha = opacity * (coverage[..., None] if image.ndim == 3 else coverage)
        image[rows, cols] = image[rows, cols] * (1.0 - alpha) + np.asarray(value, dtype=np.float32) * alpha

    def coverage(self, shape: Shape, edge_px: float = 1.0) -> tuple[slice, slice, np.ndarray]:
        """(row slice, column slice, 0-1 coverage of `shape` inside them)."""
        kind, cx, cy, a, b, *rest = shape
        rows, cols = self._box(cy, b), self._box(cx, a)
        y, x = np.meshgrid(self.axis[rows], self.axis[cols], indexing="ij")
        if kind == "bar":
            inside = np.minimum(a - np.abs(x - cx), b - np.abs(y - cy))
            return rows, cols, np.clip(inside * self.px / edge_px + 0.5, 0.0, 1.0)
        outer = self._ellipse(x - cx, y - cy, a, b, edge_px)
        if kind == "ellipse":
            return rows, cols, outer
        thickness = rest[0]
        ring = outer * (1.0 - self._ellipse(x - cx, y - cy, a - thickness, b - thickness, edge_px))
        return rows, cols, ring * (y < cy) if kind == "arc" else ring

    def _box(self, centre: float, half: float) -> slice:
        lo = int(np.floor((centre - half + 1.0) * self.px)) - 2
        hi = int(np.ceil((centre + half + 1.0) * self.px)) + 2
        return slice(max(0, lo), min(self.size, max(0, hi)))

    def _ellipse(self, dx, dy, rx, ry, edge_px) -> np.ndarray:
        d = np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2)
        return np.clip((1.0 - d) * min(rx, ry) * self.px / edge_px + 0.5, 0.0, 1.0)


def _blend(image: np.ndarray, mask: np.ndarray, value) -> np.ndarray:
    """Blend `value` into `image` with a full-size 0-1 mask."""
    return image * (1.0 - mask[..., None]) + np.asarray(value, dtype=np.float32) * mask[..., None]


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur (edges replicated) over the first two axes."""
    if sigma_px <= 0.05:
        return image
    radius = max(1, int(3 * sigma_px))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma_px) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    for axis in (0, 1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (radius, radius)
        padded = np.pad(image, pad, mode="edge")
        n = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return image


def _smooth_noise(rng: np.random.Generator, size: int, cells: int = 8) -> np.ndarray:
    """Low-frequency noise, roughly unit variance, by bicubic upsampling of a coarse grid."""
    coarse = Image.fromarray(rng.standard_normal((cells, cells)).astype(np.float32))
    return np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def render_scene(scene: Scene, rng: np.random.Generator, size: int = 128) -> Image.Image:
    """Draw a scene: 'L' image for radiology, 'RGB' for histology."""
    canvas = _Canvas(size)
    if scene.modality == "histology":
        pixels = _render_histology(scene, rng, canvas)
        return Image.fromarray(_to_uint8(pixels))
    return Image.fromarray(_to_uint8(_render_radiology(scene, rng, canvas)))


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.round(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_radiology(scene: Scene, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    style = STYLES[scene.modality]
    anatomy = ANATOMY[(scene.organ, scene.view)]
    scale = canvas.size / 128.0
    cx, cy, rx, ry = anatomy.body
    image = np.full((canvas.size, canvas.size), style.tissue["bg"], dtype=np.float32)
    canvas.paint(image, ("ellipse", cx, cy, rx + 0.04, ry + 0.04), style.tissue["fat"])
    canvas.paint(image, ("ellipse", cx, cy, rx, ry), style.tissue["soft"])
    for shape, tissue, opacity in anatomy.parts:
        canvas.paint(image, shape, style.tissue[tissue], opacity)
    rows, cols, body = canvas.coverage(("ellipse", cx, cy, rx, ry))
    image[rows, cols] += style.texture * _smooth_noise(rng, canvas.size)[rows, cols] * body
    if style.table and scene.plane == "axial":
        canvas.paint(image, ("bar", 0.0, cy + ry + 0.14, 0.8, 0.025), 0.7)
    if style.bias_field:
        image *= 0.975 + 0.025 * np.tanh(_smooth_noise(rng, canvas.size, cells=3))
    image = _blur(image, style.blur * scale) + rng.normal(0.0, style.noise, image.shape).astype(np.float32)
    for lesion in scene.lesions:
        canvas.paint(image, ("ellipse", lesion.x, lesion.y, lesion.r, lesion.r), 1.0, edge_px=2.0 * scale)
    return image


def _render_histology(scene: Scene, rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    palette = HISTOLOGY_PALETTES[scene.stain_color]
    size, scale = canvas.size, canvas.size / 128.0
    image = np.asarray(palette["stroma"], dtype=np.float32) * (1.0 + 0.04 * _smooth_noise(rng, size, cells=16))[..., None]
    for _ in range(int(rng.integers(2, 6))):
        canvas.paint(image, ("ellipse", *rng.uniform(-0.9, 0.9, 2), *rng.uniform(0.06, 0.18, 2)), palette["lumen"])
    centres = rng.uniform(0, size, (int(130 * scale**2), 2))
    image = _blend(image, _disks(size, centres, rng.uniform(1.2, 2.2, len(centres)) * scale), palette["nucleus"])
    for lesion in scene.lesions:
        canvas.paint(image, ("ellipse", lesion.x, lesion.y, lesion.r, lesion.r), palette["nest"], opacity=0.8)
        image = _blend(image, _nest_nuclei(rng, canvas, lesion), palette["tumour"])
    return _blur(image, 0.5 * scale)


def _nest_nuclei(rng: np.random.Generator, canvas: _Canvas, lesion: Lesion) -> np.ndarray:
    """Crowded large nuclei filling the lesion disk."""
    radius_px = lesion.r * canvas.px
    n = int(1.6 * radius_px**2 / (2.4 * canvas.size / 128.0) ** 2) + 3
    angle = rng.uniform(0, 2 * np.pi, n)
    dist = radius_px * 0.9 * np.sqrt(rng.uniform(0, 1, n))
    centres = np.stack([(lesion.x + 1) * canvas.px + dist * np.cos(angle),
                        (lesion.y + 1) * canvas.px + dist * np.sin(angle)], axis=1)  # fmt: skip
    return _disks(canvas.size, centres, rng.uniform(2.0, 3.0, n) * canvas.size / 128.0)


def _disks(size: int, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Union of filled disks (pixel units; centres as (x, y)) as a 0-1 mask."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for (x, y), r in zip(centres, radii):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
    return np.asarray(mask, dtype=np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Questions


@dataclass(frozen=True)
class QuestionKind:
    """One kind of question in one form.

    form: "open" (answer = the attribute), "yesno" (asks about one value; answer yes/no — or, for
    attributes that are themselves yes/no, asks without a value), "choice" (offers the true value and
    one other, in random order; answer = the true value; CLOSED like VQA-RAD's "x or y?").
    `attribute` returns the scene's value, or None where the kind does not apply.
    `weight` sets how often the kind is asked where it applies.
    """

    name: str
    question_type: str
    form: str
    attribute: Callable[[Scene], str | None]
    options: tuple[str, ...]
    templates: tuple[str, ...]
    weight: float
    phrases: dict[str, str] | None = None

    def phrase(self, value: str) -> str:
        return (self.phrases or {}).get(value, value)


def _single(scene: Scene) -> Lesion | None:
    return scene.lesions[0] if len(scene.lesions) == 1 else None


def _presence(scene: Scene) -> str:
    return "yes" if scene.lesions else "no"


def _normal(scene: Scene) -> str:
    return "no" if scene.lesions else "yes"


def _finding(scene: Scene) -> str:
    return FINDING[scene.organ] if scene.lesions else "none"


def _side(scene: Scene) -> str | None:
    lesion = _single(scene)
    return lesion.side if lesion and scene.lateral else None


def _size(scene: Scene) -> str | None:
    lesion = _single(scene)
    return lesion.size if lesion else None


def _larger_side(scene: Scene) -> str | None:
    if len(scene.lesions) != 2 or not scene.lateral:
        return None
    return max(scene.lesions, key=lambda lesion: lesion.r).side


def _count(scene: Scene) -> str:
    return str(len(scene.lesions))


def _count_if_any(scene: Scene) -> str | None:
    return _count(scene) if scene.lesions else None


def _description(scene: Scene) -> str:
    """A one-line report of everything in the picture (LLaVA-Med's "detailed description" kind):
    modality, organ, plane or stain, and each lesion's size and side."""
    what = scene.modality if scene.organ is None else f"{scene.modality} of the {scene.organ}"
    parts = [what] + [f"{scene.plane} plane"] * bool(scene.plane) + [f"{scene.stain_color} stain"] * bool(scene.stain_color)
    if not scene.lesions:
        return ", ".join(parts + ["no lesion"])
    count = {1: "one", 2: "two", 3: "three"}[len(scene.lesions)]
    parts.append(f"{count} lesion" + "s" * (len(scene.lesions) > 1))
    for lesion in sorted(scene.lesions, key=lambda lesion: lesion.x):
        parts.append(f"{lesion.size} on the {lesion.side}" if scene.lateral else lesion.size)
    return ", ".join(parts)


MODALITY_PHRASES = {"x-ray": "an X-ray", "ct": "a CT scan", "mri": "an MRI", "histology": "a histology slide"}
COUNT_PHRASES = {"1": "one lesion", "2": "two lesions", "3": "three lesions"}
KINDS: tuple[QuestionKind, ...] = (
    QuestionKind("describe_open", "DESC", "open", _description, (), (
        "Describe the image.", "Describe what you see in this image.", "Give a short report of this image."), 2.0),
    QuestionKind("modality_open", "MODALITY", "open", lambda s: s.modality, MODALITIES, (
        "What imaging modality is this?", "How was this image acquired?", "What kind of image is this?"), 1.0),
    QuestionKind("modality_yesno", "MODALITY", "yesno", lambda s: s.modality, MODALITIES, (
        "Is this {value}?", "Is this image {value}?", "Does this picture show {value}?"), 1.0, MODALITY_PHRASES),
    QuestionKind("modality_choice", "MODALITY", "choice", lambda s: s.modality, MODALITIES, (
        "Is this {a} or {b}?", "Was this image made as {a} or {b}?", "Which is it, {a} or {b}?"),
        0.6, MODALITY_PHRASES),
    QuestionKind("organ_open", "ORGAN", "open", lambda s: s.organ, ORGANS, (
        "What organ is shown?", "Which part of the body is imaged?", "What body region does this image show?"), 1.0),
    QuestionKind("organ_yesno", "ORGAN", "yesno", lambda s: s.organ, ORGANS, (
        "Is this an image of the {value}?", "Does this image show the {value}?", "Is the {value} shown here?"), 1.0),
    QuestionKind("plane_open", "PLANE", "open", lambda s: s.plane, PLANES, (
        "In which plane is this image taken?", "What is the plane of this image?", "Which imaging plane is shown?"),
        1.2),
    QuestionKind("plane_yesno", "PLANE", "yesno", lambda s: s.plane, PLANES, (
        "Is this image in the {value} plane?", "Was this image taken in the {value} plane?", "Is this slice {value}?"),
        1.2),
    QuestionKind("pres_open", "PRES", "open", _finding, ("none", *sorted(set(FINDING.values()))), (
        "What lesion is seen in this image?", "What abnormality is present?", "What finding is visible here?"), 0.8),
    QuestionKind("pres_yesno", "PRES", "yesno", _presence, YES_NO, (
        "Is there a lesion?", "Is a mass present in this image?", "Can you see a lesion here?"), 1.6),
    QuestionKind("abn_yesno", "ABN", "yesno", _normal, YES_NO, (
        "Is this image normal?", "Does this image look normal?", "Is this a normal study?"), 1.0),
    QuestionKind("pos_open", "POS", "open", _side, SIDES, (
        "Where is the lesion?", "On which side is the lesion?", "Which side of the patient is the lesion on?"), 2.0),
    QuestionKind("pos_yesno", "POS", "yesno", _side, SIDES, (
        "Is the lesion on the {value} side?", "Is the lesion located on the patient's {value}?",
        "Is the abnormality on the {value}?"), 2.5),
    QuestionKind("pos_choice", "POS", "choice", _side, SIDES, (
        "Is the lesion on the {a} or the {b}?", "Is the lesion located on the {a} or {b} side?",
        "Which side is the lesion on, {a} or {b}?"), 2.0),
    QuestionKind("count_open", "COUNT", "open", _count, COUNTS, (
        "How many lesions are there?", "How many lesions can be seen?", "What is the number of lesions?"), 0.8),
    QuestionKind("count_yesno", "COUNT", "yesno", _count_if_any, ("1", "2", "3"), (
        "Does the image show exactly {value}?", "Can exactly {value} be seen?", "Do you see exactly {value}?"),
        1.0, COUNT_PHRASES),
    QuestionKind("size_open", "SIZE", "open", _size, SIZES, (
        "How large is the lesion?", "What is the size of the lesion?", "How big is the lesion?"), 1.5),
    QuestionKind("size_yesno", "SIZE", "yesno", _size, SIZES, (
        "Is the lesion {value}?", "Is this a {value} lesion?", "Would you call the lesion {value}?"), 1.5),
    QuestionKind("size_compare_yesno", "SIZE", "yesno", _larger_side, SIDES, (
        "Is the lesion on the {value} larger than the one on the {other}?",
        "Is the {value} lesion bigger than the {other} one?", "Is the {value}-sided lesion the larger one?"), 2.5),
    QuestionKind("size_compare_choice", "SIZE", "choice", _larger_side, SIDES, (
        "Which lesion is larger, the {a} or the {b} one?", "Is the {a} or the {b} lesion bigger?",
        "Which side has the larger lesion, {a} or {b}?"), 2.0),
    QuestionKind("color_open", "COLOR", "open", lambda s: s.stain_color, STAIN_COLORS, (
        "What color is the staining?", "What is the color of the stained tissue?",
        "Which color dominates this slide?"), 1.0),
    QuestionKind("color_yesno", "COLOR", "yesno", lambda s: s.stain_color, STAIN_COLORS, (
        "Is the tissue stained {value}?", "Is the staining {value}?", "Are the cells stained {value}?"), 1.0),
)


@dataclass(frozen=True)
class Question:
    """One asked question with its answer; `index` picks the paraphrase among `kind.templates`."""

    text: str
    answer: str
    kind: QuestionKind
    index: int

    @property
    def template(self) -> str:
        """The kind and paraphrase, as "kind/index" (recorded with every row)."""
        return f"{self.kind.name}/{self.index}"

    @property
    def answer_type(self) -> str:
        return "OPEN" if self.kind.form == "open" else "CLOSED"


def ask(kind: QuestionKind, truth: str, rng: np.random.Generator) -> Question:
    """Phrase one question about an attribute whose true value is `truth` (see module balance note)."""
    index = int(rng.integers(len(kind.templates)))
    template = kind.templates[index]
    others = [option for option in kind.options if option != truth]
    if kind.form == "open":
        return Question(template, truth, kind, index)
    if kind.form == "choice":
        pair = (truth, _pick(rng, others))
        a, b = pair if rng.random() < 0.5 else pair[::-1]
        return Question(template.format(a=kind.phrase(a), b=kind.phrase(b)), truth, kind, index)
    if kind.options == YES_NO:
        return Question(template, truth, kind, index)
    return _verification(kind, truth, truth if rng.random() < 0.5 else _pick(rng, others), index)


def _verification(kind: QuestionKind, truth: str, value: str, index: int) -> Question:
    """Template `index` of a value-verification kind asking whether the attribute is `value`."""
    other = next((o for o in kind.options if o != value), "") if len(kind.options) == 2 else ""
    text = kind.templates[index].format(value=kind.phrase(value), other=kind.phrase(other))
    return Question(text, "yes" if value == truth else "no", kind, index)


def ask_about(scene: Scene, rng: np.random.Generator, inclusion: dict[str, float],
              paired: bool = False) -> list[Question]:
    """The questions asked of one image: each applicable kind independently with its probability; with
    `paired`, a value-verification question also comes back with its answer flipped (another value asked)."""
    questions = []
    for kind in KINDS:
        truth = kind.attribute(scene)
        if truth is not None and rng.random() < inclusion[kind.name]:
            questions.append(ask(kind, truth, rng))
            if paired and kind.form == "yesno" and kind.options != YES_NO:
                asked = questions[-1]
                value = truth if asked.answer == "no" else _pick(rng, [o for o in kind.options if o != truth])
                questions.append(_verification(kind, truth, value, asked.index))
    order = rng.permutation(len(questions))
    return [questions[i] for i in order]


@cache
def inclusion_probabilities(questions_per_image: float, emphasis: tuple[tuple[str, float], ...] = ()) -> dict[str, float]:
    """Per-kind probability of being asked where it applies, scaled so an image gets
    `questions_per_image` questions on average (applicability estimated on fixed-seed scenes).
    `emphasis` ((kind name, weight multiplier), ...) re-weights kinds before the scaling."""
    rng = np.random.default_rng(20240601)
    scenes = [sample_scene(rng) for _ in range(2000)]
    applies = np.array([np.mean([k.attribute(s) is not None for s in scenes]) for k in KINDS])
    factors = dict(emphasis)
    weights = np.array([k.weight * factors.get(k.name, 1.0) for k in KINDS])
    low, high = 0.0, 10.0
    for _ in range(50):
        scale = (low + high) / 2
        expected = float((applies * np.minimum(1.0, scale * weights)).sum())
        low, high = (scale, high) if expected < questions_per_image else (low, scale)
    return {k.name: float(min(1.0, low * w)) for k, w in zip(KINDS, weights)}


# ----------------------------------------------------------------------------------------------
# Writing a dataset folder


def generate_synthetic(out_dir: str | Path, config: SynthConfig = SynthConfig(), *, progress=None) -> SynthResult:
    """Write `train.json`, `test.json` (conversation format), `images/synth_{split}_{i:05d}.png` and,
    last and atomically, `meta.json` into `out_dir`. A folder without meta.json is incomplete.

    `progress`, if given, is called as progress(done_questions, total_questions) while writing.
    """
    out_dir = Path(out_dir)
    (out_dir / "meta.json").unlink(missing_ok=True)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("synth_*.png"):
        stale.unlink()
    total = config.n_train + config.n_test
    splits = {}
    for split_index, split in enumerate(SPLITS):
        target = getattr(config, f"n_{split}")
        done = config.n_train if split == "test" else 0
        report = (lambda n, d=done: progress(d + n, total)) if progress else None
        splits[split] = _write_split(out_dir, split, split_index, target, config, report)
    meta = _meta(config, splits)
    write_json_atomic(out_dir / "meta.json", meta)
    return SynthResult(
        out_dir=out_dir,
        n_train_questions=len(splits["train"]),
        n_test_questions=len(splits["test"]),
        n_train_images=meta["splits"]["train"]["images"],
        n_test_images=meta["splits"]["test"]["images"],
    )


def _write_split(out_dir: Path, split: str, split_index: int, target: int, config: SynthConfig, report) -> list[dict]:
    records: list[dict] = []
    for number, (scene, questions, image_rng) in enumerate(_images_with_questions(config, split_index)):
        image_name = f"images/synth_{split}_{number:05d}.png"
        render_scene(scene, image_rng, config.image_size).save(out_dir / image_name, format="PNG", compress_level=1)
        for k, question in enumerate(questions[: target - len(records)]):
            records.append(_record(f"synth_{split}_{number:05d}_q{k}", image_name, split, scene, question))
        if report:
            report(len(records))
        if len(records) >= target:
            break
    write_json_atomic(out_dir / f"{split}.json", records)
    return records


def _images_with_questions(config: SynthConfig, split_index: int) -> Iterator[tuple]:
    """(scene, questions, rng for drawing) per image that gets at least one question."""
    train = SPLITS[split_index] == "train"
    emphasis = tuple(sorted(config.train_emphasis.items())) if train else ()
    inclusion = inclusion_probabilities(config.questions_per_image, emphasis)
    draw = 0
    while True:
        rng = np.random.default_rng([config.seed, split_index, draw, 0])
        scene = sample_scene(rng)
        questions = ask_about(scene, rng, inclusion, paired=train and config.train_paired)
        if questions:
            yield scene, questions, np.random.default_rng([config.seed, split_index, draw, 1])
        draw += 1


def _record(record_id: str, image: str, split: str, scene: Scene, question: Question) -> dict:
    record = {
        "id": record_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": f"<image>\n{question.text}"},
            {"from": "gpt", "value": question.answer},
        ],
        "answer_type": question.answer_type,
        "question_type": question.kind.question_type,
        "template": question.template,
        "modality": scene.modality,
        "organ": scene.organ,
        "plane": scene.plane,
        "dataset": "synthetic",
        "split": split,
    }
    return {key: value for key, value in record.items() if value is not None}


def _meta(config: SynthConfig, splits: dict[str, list[dict]]) -> dict:
    def summary(records: list[dict]) -> dict:
        types = Counter(r["answer_type"] for r in records)
        return {"questions": len(records), "images": len({r["image"] for r in records}),
                "open": types["OPEN"], "closed": types["CLOSED"]}  # fmt: skip

    def answers(records: list[dict]) -> dict:
        table: dict[str, Counter] = defaultdict(Counter)
        for r in records:
            table[r["template"]][r["conversations"][1]["value"]] += 1
        return {template: dict(sorted(counts.items())) for template, counts in sorted(table.items())}

    return {
        "generator": "tinymed.data.synthetic",
        "version": GENERATOR_VERSION,
        "config": config.model_dump(),
        "laterality": "patient side, radiological convention: the patient's left is on the image's right",
        "splits": {split: summary(records) for split, records in splits.items()},
        "answer_distribution": {split: answers(records) for split, records in splits.items()},
    }


def default_cache_dir(config: SynthConfig = SynthConfig()) -> Path:
    """`$TINYMED_CACHE` (default ~/.cache/tinymed) / synthetic-v{version}-seed{seed}[-{size tag}]."""
    root = Path(os.environ.get("TINYMED_CACHE") or Path.home() / ".cache" / "tinymed").expanduser()
    name = f"synthetic-v{GENERATOR_VERSION}-seed{config.seed}"
    if config.model_copy(update={"seed": 0}) != SynthConfig():
        name += f"-{config.n_train}-{config.n_test}-{config.image_size}px-q{config.questions_per_image:g}"
        name += "".join(f"-{kind}x{factor:g}" for kind, factor in sorted(config.train_emphasis.items()))
        name += "-paired" if config.train_paired else ""
    return root / name


def is_complete(out_dir: str | Path, config: SynthConfig) -> bool:
    """Whether `out_dir` holds a finished set generated by this generator version with `config`."""
    meta_file = Path(out_dir) / "meta.json"
    if not meta_file.is_file():
        return False
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("version") == GENERATOR_VERSION and meta.get("config") == config.model_dump()


def ensure_default_dataset(config: SynthConfig = SynthConfig()) -> Path:
    """The synthetic set for `config` in the cache folder, generated on first use (a few seconds)
    and reused while its meta.json matches. Generation goes to a temporary sibling folder that is
    renamed into place, so concurrent callers never see a half-written set."""
    target = default_cache_dir(config)
    if is_complete(target, config):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    generate_synthetic(staging, config)
    if target.exists() and not is_complete(target, config):
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    if not is_complete(target, config):
        raise RuntimeError(f"synthetic dataset in {target} is incomplete after generation")
    return target
