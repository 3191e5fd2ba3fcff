"""Decode what a client sends (PNG, JPEG or DICOM bytes, or a `data:` URL of them) into the RGB PIL image
the model sees, with limits against hostile input.

The result goes through the same path as local evaluation (an RGB PIL image → the processor), so an
answer through the API equals `generate_answers` on the same image. Error messages name what was wrong
(format, size, transfer syntax) and never carry DICOM element values: patient data stays out of logs.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from tinymed.data.images import stretch_to_uint8, to_model_rgb

# pydicom warns about malformed elements quoting their values (a patient's name among them): silence it.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

RASTER_FORMATS = ("PNG", "JPEG")
DICOM_MIME = "application/dicom"


class ImageLimits(BaseModel):
    """What an uploaded image may be."""

    max_bytes: int = Field(20 * 2**20, gt=0, description="encoded size, bytes")
    max_pixels: int = Field(40_000_000, gt=0, description="width × height of the (one decoded) frame")


class ImageError(ValueError):
    """An image that cannot be used; `status` is the HTTP status to answer with (400, 413 or 415)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_image"):
        super().__init__(message)
        self.status = status
        self.code = code


@dataclass
class DecodedImage:
    """The RGB image the model gets, and a patient-free description of where it came from."""

    image: Image.Image
    source: str  # e.g. "PNG", "DICOM MR MONOCHROME2, frame 8 of 15"


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then the `DICM` marker."""
    return len(data) >= 132 and data[128:132] == b"DICM"


def parse_data_url(url: str) -> tuple[str, dict[str, str], bytes]:
    """Split `data:MIME[;k=v]*;base64,PAYLOAD` into (mime, params, bytes). Only base64 data URLs."""
    if not url.startswith("data:"):
        raise ImageError(
            "image_url must be a data: URL (data:image/png;base64,...); the server fetches nothing from the network",
            code="invalid_image_url",
        )
    header, sep, payload = url[5:].partition(",")
    fields = header.split(";")
    if not sep or fields[-1] != "base64":
        raise ImageError("image data URL must be base64-encoded (data:MIME;base64,...)", code="invalid_image_url")
    params = dict(f.split("=", 1) for f in fields[1:-1] if "=" in f)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image data URL payload is not valid base64", code="invalid_image_url") from None
    return fields[0].lower(), params, data


def decode_data_url(url: str, limits: ImageLimits) -> DecodedImage:
    """Decode an OpenAI `image_url` data URL; a `frame=N` parameter picks a DICOM frame (0-based)."""
    mime, params, data = parse_data_url(url)
    frame = params.get("frame")
    if frame is not None and not frame.isdigit():
        raise ImageError(f"data URL parameter frame={frame!r} is not a frame number", code="invalid_image_url")
    if mime == DICOM_MIME and not is_dicom(data):
        raise ImageError("data is labelled application/dicom but has no DICM marker at byte 128", code="invalid_dicom")
    return decode_image(data, limits, frame=None if frame is None else int(frame))


def decode_image(data: bytes, limits: ImageLimits, frame: int | None = None) -> DecodedImage:
    """PNG, JPEG or DICOM bytes → RGB image (DICOM recognised by its marker, whatever it was called)."""
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes; the limit is {limits.max_bytes}", 413, "image_too_large")
    if is_dicom(data):
        return decode_dicom(data, limits, frame)
    return DecodedImage(decode_raster(data, limits), "")


def _check_pixels(width: int, height: int, limits: ImageLimits) -> None:
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}×{height} = {width * height} pixels; the limit is {limits.max_pixels}",
            413,
            "image_too_large",
        )


def decode_raster(data: bytes, limits: ImageLimits) -> Image.Image:
    """PNG/JPEG → RGB, as `MedVQASample.load_image` does; size is checked from the header before decoding."""
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError(f"image exceeds the pixel limit of {limits.max_pixels}", 413, "image_too_large") from None
    except (OSError, ValueError, SyntaxError):
        raise ImageError("not a PNG, JPEG or DICOM image", 415, "unsupported_image_format") from None
    if img.format not in RASTER_FORMATS:
        raise ImageError(f"image format {img.format} is not accepted; send PNG, JPEG or DICOM", 415, "unsupported_image_format")
    _check_pixels(*img.size, limits)
    try:
        img.load()
        return to_model_rgb(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        raise ImageError(f"{img.format} image is truncated or corrupt", code="corrupt_image") from None


def decode_dicom(data: bytes, limits: ImageLimits, frame: int | None = None) -> DecodedImage:
    """DICOM → RGB: one frame (given, else the middle), modality + VOI LUT (or window), MONOCHROME1
    inverted, palette colour expanded, stretched to 8 bits."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, KeyError, EOFError):
        raise ImageError("DICOM file could not be parsed (corrupt or truncated)", code="invalid_dicom") from None
    modality = str(ds.get("Modality", "") or "unknown modality")
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError(
            f"DICOM object ({modality}, {_sop_class_name(ds)}) holds no image: it has no pixel data",
            422,
            "dicom_without_image",
        )
    rows, cols, n_frames = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0), _frame_count(ds)
    _check_pixels(cols, rows, limits)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise ImageError(f"frame {index} requested but the DICOM has {n_frames} frame(s) (0-based)", code="invalid_frame")
    pixels = _decode_frame(ds, index if n_frames > 1 else None)
    photometric = str(ds.get("PhotometricInterpretation", ""))
    rgb = _to_rgb8(pixels, ds, photometric)
    frame_note = f", frame {index + 1} of {n_frames}" if n_frames > 1 else ""
    return DecodedImage(Image.fromarray(rgb, "RGB"), f"DICOM {modality} {photometric}{frame_note}")


def _sop_class_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or "unknown SOP class"


def _frame_count(ds) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        raise ImageError("DICOM NumberOfFrames is not a number", code="invalid_dicom") from None


def _decode_frame(ds, index: int | None) -> np.ndarray:
    """Decoded pixels of one frame (YBR converted to RGB); 415 when no installed decoder handles the syntax."""
    from pydicom.pixels import get_decoder, pixel_array

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        raise ImageError("DICOM file meta has no transfer syntax", code="invalid_dicom")
    syntax_label = f"{syntax.name} ({syntax})"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ImageError(f"DICOM transfer syntax {syntax_label} is not supported", 415, "unsupported_transfer_syntax") from None
    if not decoder.is_available:
        raise ImageError(
            f"DICOM transfer syntax {syntax_label} cannot be decoded: no decoder for it is installed "
            "(e.g. pylibjpeg with pylibjpeg-libjpeg / pylibjpeg-openjpeg, or pyjpegls)",
            415,
            "unsupported_transfer_syntax",
        )
    try:
        return pixel_array(ds, index=index)
    except Exception:  # any decoder failure; its message may quote element values, so it is not forwarded
        if syntax.is_compressed:
            raise ImageError(
                f"DICOM pixel data in {syntax_label} could not be decoded by the installed decoders "
                "(unsupported variant such as 12-bit JPEG, or corrupt data)",
                415,
                "unsupported_transfer_syntax",
            ) from None
        raise ImageError("DICOM pixel data could not be decoded (corrupt or truncated)", code="invalid_dicom") from None


def _to_rgb8(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)
        return (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    if pixels.ndim == 3:  # RGB (pydicom converts YBR to RGB while decoding)
        bits = int(ds.get("BitsStored", 8) or 8)
        return stretch_to_uint8(pixels.astype(np.float64), 0.0, float(2**bits - 1)) if bits != 8 else pixels.astype(np.uint8)
    if not photometric.startswith("MONOCHROME"):
        raise ImageError(f"DICOM photometric interpretation {photometric or '(missing)'} is not supported", 415,
                         "unsupported_photometric_interpretation")
    values = apply_voi_lut(apply_modality_lut(pixels, ds), ds).astype(np.float64)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:  # the VOI output range: what the window maps to
        low, high = apply_voi_lut(np.array([-(2**40), 2**40], dtype=np.int64), ds).astype(np.float64)
    else:  # no VOI in the file: stretch the modality values' own range
        low, high = values.min(), values.max()
    grey = stretch_to_uint8(values, float(low), float(high))
    if photometric == "MONOCHROME1":  # MONOCHROME1: low values are white
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def png_data_url(image: Image.Image) -> str:
    """Lossless PNG data URL of an image (decoding it gives back exactly the same RGB pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
