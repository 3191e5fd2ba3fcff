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
import math
import re
import warnings
from collections.abc import Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from tinymed.data.images import stretch_to_uint8, to_model_rgb

# pydicom warns about malformed elements quoting their values (a patient's name among them): silence it.
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
logging.getLogger("pydicom").setLevel(logging.CRITICAL)

RASTER_FORMATS = ("PNG", "JPEG")
_FRAME_NUMBER = re.compile(r"[0-9]{1,9}")  # not str.isdigit: "²" is a digit to it, and int("²") fails
DICOM_MIME = "application/dicom"


class ImageLimits(BaseModel):
    """What an uploaded image may be."""

    max_bytes: int = Field(20 * 2**20, gt=0, description="encoded size, bytes")
    max_pixels: int = Field(
        4096 * 4096, gt=0, description="width × height of the (one decoded) frame; checked from the header, "
        "before anything is decoded (4096² ≈ 50 MB as RGB: a mammogram fits, a 38 KB PNG bomb of 6300² does not)")


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
    if frame is not None and not _FRAME_NUMBER.fullmatch(frame):
        raise ImageError("data URL parameter frame is not a frame number (0, 1, 2, ... in ASCII digits)",
                         code="invalid_image_url")
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
    inverted, palette colour expanded, stretched to 8 bits. Every header value the decoding relies on is
    checked first: a missing, empty, non-numeric or out-of-range one is an `ImageError` naming it."""
    import pydicom

    with _malformed("file could not be parsed (corrupt or truncated)"):
        ds = pydicom.dcmread(io.BytesIO(data))
    modality = _code_string(ds, "Modality") or "unknown modality"
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError(
            f"DICOM object ({modality}, {_sop_class_name(ds)}) holds no image: it has no pixel data",
            422,
            "dicom_without_image",
        )
    pixel = _pixel_module(ds, limits)
    index = pixel.frames // 2 if frame is None else frame
    if not 0 <= index < pixel.frames:
        raise ImageError(f"frame {index} requested but the DICOM has {pixel.frames} frame(s) (0-based)",
                         code="invalid_frame")
    pixels = _decode_frame(ds, index if pixel.frames > 1 else None)
    rgb = _to_rgb8(pixels, ds, pixel)
    frame_note = f", frame {index + 1} of {pixel.frames}" if pixel.frames > 1 else ""
    return DecodedImage(Image.fromarray(rgb, "RGB"), f"DICOM {modality} {pixel.photometric}{frame_note}")


@contextmanager
def _malformed(what: str, status: int = 400, code: str = "invalid_dicom") -> Iterator[None]:
    """pydicom or numpy failing on hostile header values becomes an `ImageError` saying "DICOM {what}".
    Their own messages may quote element values (patient data), so they are not forwarded."""
    try:
        yield
    except ImageError:
        raise
    except Exception:  # pydicom raises many types (ValueError, struct.error, AttributeError, ...) on bad bytes
        raise ImageError(f"DICOM {what}", status, code) from None


def _value(ds, keyword: str):
    """An element's value, or None when it is absent or empty (pydicom converts the raw bytes here)."""
    with _malformed(f"{keyword} is malformed (its value cannot be read)"):
        value = ds.get(keyword)
    return None if value is None or (isinstance(value, Sized) and len(value) == 0) else value


def _values(ds, keyword: str) -> list:
    value = _value(ds, keyword)
    if value is None:
        return []
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else [value]


def _integer(ds, keyword: str, low: int, high: int, default: int | None = None) -> int:
    """A single integer element within [low, high]; `default` when absent (else it is required)."""
    values = _values(ds, keyword)
    if not values and default is not None:
        return default
    if len(values) != 1 or isinstance(values[0], bool) or not isinstance(values[0], int):
        raise ImageError(f"DICOM {keyword} must be one integer{'' if values else ' (it is missing)'}",
                         code="invalid_dicom")
    if not low <= values[0] <= high:
        raise ImageError(f"DICOM {keyword} must be between {low} and {high}", code="invalid_dicom")
    return values[0]


def _numbers(ds, keyword: str) -> list[float]:
    """The finite numbers an element holds (empty when absent)."""
    try:
        numbers = [float(v) for v in _values(ds, keyword)]
    except (TypeError, ValueError):
        raise ImageError(f"DICOM {keyword} is not a number", code="invalid_dicom") from None
    if not all(math.isfinite(n) for n in numbers):
        raise ImageError(f"DICOM {keyword} is not a finite number", code="invalid_dicom")
    return numbers


def _code_string(ds, keyword: str) -> str:
    """A code string element (upper-case letters, digits, space, underscore), or "" when absent or not one."""
    value = _value(ds, keyword)
    return value if isinstance(value, str) and _CODE_STRING.fullmatch(value) else ""


_CODE_STRING = re.compile(r"[A-Z0-9_ ]{1,16}")
SAMPLES = {"MONOCHROME1": 1, "MONOCHROME2": 1, "PALETTE COLOR": 1, "RGB": 3, "YBR_FULL": 3, "YBR_FULL_422": 3,
           "YBR_ICT": 3, "YBR_RCT": 3, "YBR_PARTIAL_420": 3}  # PS3.3 C.7.6.3.1.2
VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")  # PS3.3 C.11.2.1.3


@dataclass
class PixelModule:
    """The Image Pixel module values the decoder uses, checked (PS3.3 C.7.6.3)."""

    rows: int
    columns: int
    frames: int
    bits_stored: int
    photometric: str


def _pixel_module(ds, limits: ImageLimits) -> PixelModule:
    rows, columns = _integer(ds, "Rows", 1, 65535), _integer(ds, "Columns", 1, 65535)
    _check_pixels(columns, rows, limits)
    frames = _integer(ds, "NumberOfFrames", 1, 2**31 - 1, default=1)
    samples = _integer(ds, "SamplesPerPixel", 1, 4)
    allocated = _integer(ds, "BitsAllocated", 1, 64)
    if allocated not in (1, 8, 16, 32, 64):
        raise ImageError("DICOM BitsAllocated must be 1, 8, 16, 32 or 64", code="invalid_dicom")
    stored = _integer(ds, "BitsStored", 1, allocated)
    _integer(ds, "PixelRepresentation", 0, 1)
    if samples > 1:
        _integer(ds, "PlanarConfiguration", 0, 1)
    photometric = _code_string(ds, "PhotometricInterpretation")
    if not photometric:
        raise ImageError("DICOM PhotometricInterpretation is missing or malformed", code="invalid_dicom")
    if photometric not in SAMPLES:
        raise ImageError(f"DICOM PhotometricInterpretation {photometric} is not supported (one of "
                         f"{', '.join(SAMPLES)})", 415, "unsupported_photometric_interpretation")
    if SAMPLES[photometric] != samples:
        raise ImageError(f"DICOM PhotometricInterpretation {photometric} needs SamplesPerPixel "
                         f"{SAMPLES[photometric]}", code="invalid_dicom")
    return PixelModule(rows, columns, frames, stored, photometric)


def _sop_class_name(ds) -> str:
    uid = _value(ds, "SOPClassUID")
    name = getattr(uid, "name", None)
    return name if name and name != str(uid) else "unknown SOP class"


def _decode_frame(ds, index: int | None) -> np.ndarray:
    """Decoded pixels of one frame (YBR converted to RGB); 415 when no installed decoder handles the syntax."""
    from pydicom.pixels import get_decoder, pixel_array
    from pydicom.uid import UID

    syntax = _value(ds.file_meta, "TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if not isinstance(syntax, UID):  # absent, or several values
        raise ImageError("DICOM file meta TransferSyntaxUID is missing or not one UID", code="invalid_dicom")
    syntax_label = f"{syntax.name} ({syntax})" if syntax.is_valid else "(a malformed UID)"
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
    if syntax.is_compressed:
        failure = (f"pixel data in {syntax_label} could not be decoded by the installed decoders (unsupported "
                   "variant such as 12-bit JPEG, or corrupt data)", 415, "unsupported_transfer_syntax")
    else:
        failure = ("pixel data could not be decoded (corrupt or truncated, or not the size Rows, Columns, "
                   "NumberOfFrames, SamplesPerPixel and BitsAllocated give)", 400, "invalid_dicom")
    with _malformed(*failure):
        return pixel_array(ds, index=index)


def _check_lut(ds, sequence: str) -> bool:
    """Whether `sequence` (a modality or VOI LUT sequence) is present; if so its first item must hold a
    three-number LUTDescriptor and LUTData (PS3.3 C.11.1, C.11.2)."""
    items = _values(ds, sequence)
    if not items:
        return False
    item = items[0]
    descriptor = _integers_of(item, sequence, "LUTDescriptor")
    if len(descriptor) != 3 or not 0 <= descriptor[0] <= 65535 or not 8 <= descriptor[2] <= 16:
        raise ImageError(f"DICOM {sequence} LUTDescriptor must be three numbers (entries 0..65535, "
                         "first mapped value, 8..16 bits)", code="invalid_dicom")
    if not _values(item, "LUTData"):
        raise ImageError(f"DICOM {sequence} item has no LUTData", code="invalid_dicom")
    return True


def _integers_of(item, sequence: str, keyword: str) -> list[int]:
    values = _values(item, keyword)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ImageError(f"DICOM {sequence} {keyword} must be integers", code="invalid_dicom")
    return values


def _check_palette(ds) -> None:
    """PALETTE COLOR needs a three-number descriptor and (segmented or plain) data per channel (PS3.3 C.7.6.3.1.5)."""
    for colour in ("Red", "Green", "Blue"):
        table = f"{colour}PaletteColorLookupTable"
        descriptor = _integers_of(ds, "palette", f"{table}Descriptor")
        if len(descriptor) != 3 or not 8 <= descriptor[2] <= 16:
            raise ImageError(f"DICOM PALETTE COLOR image needs {table}Descriptor (three numbers, 8..16 bits)",
                             code="invalid_dicom")
        if not (_values(ds, f"{table}Data") or _values(ds, f"Segmented{table}Data")):
            raise ImageError(f"DICOM PALETTE COLOR image has no {table}Data", code="invalid_dicom")


def _check_voi(ds) -> bool:
    """Whether the file states a VOI (a LUT, or WindowCenter + WindowWidth); if so it must be usable."""
    lut = _check_lut(ds, "VOILUTSequence")
    centres, widths = _numbers(ds, "WindowCenter"), _numbers(ds, "WindowWidth")
    if bool(centres) != bool(widths):
        raise ImageError(f"DICOM {'WindowWidth' if centres else 'WindowCenter'} is missing (a window needs "
                         "WindowCenter and WindowWidth)", code="invalid_dicom")
    function = _code_string(ds, "VOILUTFunction") or "LINEAR"
    if widths and not lut:
        if function not in VOI_FUNCTIONS:
            raise ImageError(f"DICOM VOILUTFunction must be one of {', '.join(VOI_FUNCTIONS)}", code="invalid_dicom")
        if widths[0] < 1 if function == "LINEAR" else widths[0] <= 0:
            raise ImageError(f"DICOM WindowWidth must be {'at least 1' if function == 'LINEAR' else 'positive'} "
                             f"for a {function} window", code="invalid_dicom")
    return lut or bool(widths)


def _to_rgb8(pixels: np.ndarray, ds, pixel: PixelModule) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    if pixel.photometric == "PALETTE COLOR":
        _check_palette(ds)
        with _malformed("palette (Red/Green/Blue PaletteColorLookupTable) could not be applied"):
            rgb = apply_color_lut(pixels, ds)
        return (rgb >> 8).astype(np.uint8) if rgb.dtype.itemsize > 1 else rgb.astype(np.uint8)
    if pixels.ndim == 3:  # RGB (pydicom converts YBR to RGB while decoding)
        bits = pixel.bits_stored
        return stretch_to_uint8(pixels.astype(np.float64), 0.0, float(2**bits - 1)) if bits != 8 else pixels.astype(np.uint8)
    if not _check_lut(ds, "ModalityLUTSequence"):
        _numbers(ds, "RescaleSlope"), _numbers(ds, "RescaleIntercept")
    with _malformed("modality LUT (ModalityLUTSequence, or RescaleSlope and RescaleIntercept) could not be applied"):
        values = apply_modality_lut(pixels, ds)
    if _check_voi(ds):  # the VOI output range: what the window or LUT maps to
        with _malformed("VOI LUT (VOILUTSequence, or WindowCenter and WindowWidth) could not be applied"):
            values = apply_voi_lut(values, ds).astype(np.float64)
            low, high = apply_voi_lut(np.array([-(2**40), 2**40], dtype=np.int64), ds).astype(np.float64)
    else:  # no VOI in the file: stretch the modality values' own range
        values = values.astype(np.float64)
        low, high = values.min(), values.max()
    grey = stretch_to_uint8(values, float(low), float(high))
    if pixel.photometric == "MONOCHROME1":  # MONOCHROME1: low values are white
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=-1)


def png_data_url(image: Image.Image) -> str:
    """Lossless PNG data URL of an image (decoding it gives back exactly the same RGB pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
