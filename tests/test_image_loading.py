"""Images reach the model upright and with their contrast: EXIF orientation and high bit depths,
through both public entry points (dataset loading and the server's decoder)."""

import io

import numpy as np
import pytest
from PIL import Image

from tinymed.data import AnswerType, MedVQASample
from tinymed.serve.images import ImageLimits, decode_image


def _sample(data: bytes) -> MedVQASample:
    return MedVQASample(id="r1", image="mem.png", image_bytes=data, question="q", answer="a",
                        answer_type=AnswerType.OPEN, dataset="t", split="test")


def _both(data: bytes) -> list[Image.Image]:
    return [_sample(data).load_image(), decode_image(data, ImageLimits()).image]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_exif_orientation_is_applied():
    # A 40×20 image, left half black / right half white, stored with EXIF Orientation 6
    # ("rotate 90° clockwise to display"): upright it is 20×40 with black on top.
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    for img in _both(buf.getvalue()):
        arr = np.asarray(img)
        assert img.size == (20, 40)
        assert arr[:15].mean() < 30 and arr[25:].mean() > 225


def test_16_bit_grey_is_rescaled_not_clipped():
    gradient = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (8, 1))
    data = _png(Image.fromarray(gradient))
    for img in _both(data):
        arr = np.asarray(img)
        assert img.mode == "RGB"
        assert arr[..., 0].min() == 0 and arr[..., 0].max() == 255
        assert len(np.unique(arr[..., 0])) == 256  # every grey level survives
        assert abs(arr.mean() - 127.5) < 1.0


def test_12_bit_data_in_16_bit_png_uses_its_own_range():
    values = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))  # a CT-like 12-bit range
    arr = np.asarray(_sample(_png(Image.fromarray(values))).load_image())
    assert arr.min() == 0 and arr.max() == 255


def test_constant_16_bit_image_is_black_not_an_error():
    data = _png(Image.fromarray(np.full((8, 8), 1000, dtype=np.uint16)))
    for img in _both(data):
        assert np.asarray(img).max() == 0


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
def test_8_bit_images_are_unchanged(mode):
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    img = base.convert(mode)
    for decoded in _both(_png(img)):
        assert np.array_equal(np.asarray(decoded), np.asarray(img.convert("RGB")))
