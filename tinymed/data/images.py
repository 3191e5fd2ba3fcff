"""The one way tinymed turns a decoded PIL image into the RGB picture a model sees.

Dataset loading, evaluation and serving all go through `to_model_rgb`, so a model is trained on what
it is later asked about: the EXIF orientation applied (a phone photo of a film stands upright), and
high-bit-depth greyscale (16-bit PNG/TIFF `I;16*`, 32-bit `I`, float `F`) stretched from its own
value range to 0..255 — Pillow's plain `convert("RGB")` clips such images to near-white.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def stretch_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly to 0..255 (uint8, rounded, clipped); a constant image becomes black."""
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def to_model_rgb(img: Image.Image) -> Image.Image:
    """An 8-bit RGB copy of a loaded image: EXIF orientation applied, high-bit-depth grey rescaled.

    High-bit-depth greyscale is windowed to its own min..max (what a DICOM viewer does without a VOI
    window); non-finite float values count as the minimum."""
    img = ImageOps.exif_transpose(img)
    if img.mode in HIGH_DEPTH_MODES:
        values = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(values)
        if not finite.all():
            values = np.where(finite, values, values[finite].min() if finite.any() else 0.0)
        grey = stretch_to_uint8(values, float(values.min()), float(values.max()))
        return Image.fromarray(grey, "L").convert("RGB")
    return img.convert("RGB")
