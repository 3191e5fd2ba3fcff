"""DICOM decoding on real files shipped in pydicom's and nibabel's wheels, and DICOM through the API."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import nibabel
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut
from pydicom.tag import Tag

from conftest import audit_rows, save_tiny_model
from tinymed.models import generate_answers, load_model
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer
from tinymed.serve.images import ImageError, ImageLimits, decode_data_url, decode_image, png_data_url

LIMITS = ImageLimits()
NICOM = Path(nibabel.__file__).parent / "nicom" / "tests" / "data"
PATIENT = "Doe^Jane"


def pydicom_bytes(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def decode(data: bytes, frame: int | None = None) -> tuple[np.ndarray, str]:
    decoded = decode_image(data, LIMITS, frame)
    return np.asarray(decoded.image), decoded.source


def edited(name: str, **elements) -> bytes:
    """A pydicom test file with some elements changed, as bytes (never written to disk)."""
    ds = pydicom.dcmread(get_testdata_file(name))
    for key, value in elements.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def raw_element(name: str, keyword: str, vr: str, value: bytes) -> bytes:
    """A pydicom test file with one element's bytes replaced (any VR, any bytes), as bytes."""
    ds = pydicom.dcmread(get_testdata_file(name))
    tag = Tag(tag_for_keyword(keyword))
    ds[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def rejected(data: bytes, frame: int | None = None) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, LIMITS, frame)
    assert PATIENT not in str(info.value)
    return info.value


def test_ct_is_grey_rgb_at_native_size():
    pixels, source = decode(pydicom_bytes("CT_small.dcm"))
    assert pixels.shape == (128, 128, 3) and pixels.dtype == np.uint8
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert pixels.min() == 0 and pixels.max() == 255
    assert source == "DICOM CT MONOCHROME2"


def test_window_centre_and_width_are_applied():
    """MR_small declares centre 600, width 1600: DICOM PS3.3 C.11.2.1.2 linear window, scaled to 0..255."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)
    x = ds.pixel_array.astype(float) * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    expected = np.clip(((x - (centre - 0.5)) / (width - 1) + 0.5) * 255, 0, 255)
    pixels, _ = decode(pydicom_bytes("MR_small.dcm"))
    assert np.abs(pixels[..., 0].astype(float) - expected).max() <= 1.0


def test_monochrome1_is_inverted():
    normal, _ = decode(pydicom_bytes("MR_small.dcm"))
    inverted, source = decode(edited("MR_small.dcm", PhotometricInterpretation="MONOCHROME1"))
    assert (inverted == 255 - normal).all() and "MONOCHROME1" in source


def test_palette_colour_becomes_rgb():
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    pixels, _ = decode(pydicom_bytes("examples_palette.dcm"))
    assert pixels.shape == (350, 800, 3)
    assert (pixels[..., 0] != pixels[..., 2]).any()  # really colour
    assert (pixels == (apply_color_lut(ds.pixel_array, ds) >> 8)).all()


def test_multi_frame_takes_the_middle_or_the_chosen_frame():
    data = pydicom_bytes("rtdose.dcm")  # 15 frames
    all_frames = pydicom.dcmread(io.BytesIO(data)).pixel_array
    middle, source = decode(data)
    assert source.endswith("frame 8 of 15")
    first, _ = decode(data, frame=0)
    assert not (first == middle).all()
    v = all_frames[0].astype(float)  # no window in this file: the frame's own range is stretched
    assert (first[..., 0] == np.rint((v - v.min()) * 255 / (v.max() - v.min()))).all()
    assert rejected(data, frame=15).code == "invalid_frame"


def test_compressed_syntaxes_that_decode():
    assert (decode(pydicom_bytes("MR_small_RLE.dcm"))[0] == decode(pydicom_bytes("MR_small.dcm"))[0]).all()
    ybr, source = decode(pydicom_bytes("examples_ybr_color.dcm"))  # JPEG baseline, YBR, 30 frames
    assert ybr.shape == (240, 320, 3) and source.endswith("frame 16 of 30")
    rgb, _ = decode(pydicom_bytes("SC_rgb_rle_16bit.dcm"))
    assert rgb.shape == (100, 100, 3) and rgb.max() == 255


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("MR_small_jpeg_ls_lossless.dcm", 415, "JPEG-LS Lossless"),  # no decoder installed
        ("JPEG-lossy.dcm", 415, "JPEG Extended"),  # 12-bit JPEG: Pillow cannot
        ("test-SR.dcm", 422, "SR"),
        ("waveform_ecg.dcm", 422, "ECG"),
        ("MR_truncated.dcm", 400, "truncated"),
    ],
)
def test_undecodable_dicom_names_the_problem(name, status, words):
    error = rejected(pydicom_bytes(name))
    assert error.status == status and words in str(error)


def test_pixel_bomb_header_is_refused_before_decoding():
    error = rejected(edited("MR_small.dcm", Rows=60000, Columns=60000, PatientName=PATIENT))
    assert error.status == 413


def test_errors_never_quote_patient_data():
    data = edited("MR_small.dcm", PatientName=PATIENT, PatientID="ID-12345")
    cut = data[: len(data) - 200]  # truncated pixel data
    error = rejected(cut)
    assert "ID-12345" not in str(error)


@pytest.mark.parametrize("name", ["0.dcm", "slicethickness_empty_string.dcm"])
def test_nibabel_files_decode(name):
    pixels, source = decode((NICOM / name).read_bytes())
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and source.startswith("DICOM MR")
    assert pixels.max() > pixels.min()


def test_nibabel_header_only_file_is_not_an_image():
    assert rejected((NICOM / "csa_slice_norm.dcm").read_bytes()).status == 422


def test_data_url_frame_parameter_and_label():
    data = base64.b64encode(pydicom_bytes("rtdose.dcm")).decode()
    first = decode_data_url(f"data:application/dicom;frame=0;base64,{data}", LIMITS)
    assert first.source.endswith("frame 1 of 15")
    assert decode_data_url(f"data:application/octet-stream;base64,{data}", LIMITS).source.endswith("frame 8 of 15")
    png = base64.b64encode(b"\x89PNG not dicom").decode()
    with pytest.raises(ImageError, match="DICM"):
        decode_data_url(f"data:application/dicom;base64,{png}", LIMITS)


# ---- through the server ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def audit_db(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.sqlite"


@pytest.fixture(scope="module")
def served(tmp_path_factory, audit_db):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), ["is there a lesion? yes no ct mri"] * 40, text_layers=1)
    lm = load_model(folder, device="cpu")
    with BackgroundServer(create_app(lm, ServeConfig(model_name="tiny", audit_db=audit_db))) as server:
        yield lm, server


def test_dicom_in_the_api_answers_like_the_decoded_image(served):
    lm, server = served
    data = pydicom_bytes("CT_small.dcm")
    expected = generate_answers(lm, [decode_image(data, LIMITS).image], ["Is there a lesion?"], max_new_tokens=5)[0]
    for mime in ("application/dicom", "image/png"):  # recognised by the DICM marker, whatever the label
        url = f"data:{mime};base64," + base64.b64encode(data).decode()
        body = {"model": "tiny", "max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Is there a lesion?"}]}]}
        reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected.text


def test_preview_returns_the_image_the_model_sees(served):
    _, server = served
    data = pydicom_bytes("examples_palette.dcm")
    reply = httpx.post(server.url + "/api/preview", content=data, timeout=60)
    assert reply.status_code == 200
    body = reply.json()
    assert (body["width"], body["height"]) == (800, 350) and body["source"] == "DICOM US PALETTE COLOR"
    assert body["image"] == png_data_url(decode_image(data, LIMITS).image)
    png = Image.open(io.BytesIO(base64.b64decode(body["image"].split(",", 1)[1])))
    assert (np.asarray(png.convert("RGB")) == decode(data)[0]).all()


def test_dicom_errors_reach_the_client_without_patient_data(served, capfd):
    _, server = served
    data = edited("waveform_ecg.dcm", PatientName=PATIENT)
    reply = httpx.post(server.url + "/api/preview", content=data, timeout=60)
    assert reply.status_code == 422 and "ECG" in reply.json()["error"]["message"]
    url = "data:application/dicom;base64," + base64.b64encode(edited("MR_small_jpeg_ls_lossless.dcm", PatientName=PATIENT)).decode()
    body = {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == 415 and "JPEG-LS" in reply.json()["error"]["message"]
    out, err = capfd.readouterr()
    assert PATIENT not in reply.text + out + err


def _palette_without(*keywords: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    for keyword in keywords:
        delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


MALFORMED = {  # name: (DICOM bytes, data URL parameters, status, words the error must contain)
    "frame-superscript-two": (pydicom_bytes("rtdose.dcm"), ";frame=\u00b2", 400, "frame"),
    "frame-arabic-indic-three": (pydicom_bytes("rtdose.dcm"), ";frame=\u0663", 400, "frame"),
    "frame-5000-digits": (pydicom_bytes("rtdose.dcm"), ";frame=" + "9" * 5000, 400, "frame"),
    "palette-without-tables": (_palette_without(*(f"{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue"))),
                               "", 400, "PaletteColorLookupTableData"),
    "window-width-zero": (edited("MR_small.dcm", WindowWidth=0), "", 400, "WindowWidth"),
    "window-width-text": (raw_element("MR_small.dcm", "WindowWidth", "DS", b"wide"), "", 400, "WindowWidth"),
    "window-centre-nan": (raw_element("MR_small.dcm", "WindowCenter", "DS", b"nan "), "", 400, "WindowCenter"),
    "window-without-width": (raw_element("MR_small.dcm", "WindowWidth", "DS", b""), "", 400, "WindowWidth"),
    "empty-modality-lut-item": (edited("CT_small.dcm", ModalityLUTSequence=[Dataset()]), "", 400, "ModalityLUTSequence"),
    "empty-voi-lut-item": (edited("MR_small.dcm", VOILUTSequence=[Dataset()]), "", 400, "VOILUTSequence"),
    "rescale-slope-text": (raw_element("CT_small.dcm", "RescaleSlope", "DS", b"x "), "", 400, "RescaleSlope"),
    "rows-zero": (edited("CT_small.dcm", Rows=0), "", 400, "Rows"),
    "rows-as-text": (raw_element("CT_small.dcm", "Rows", "LO", b"many"), "", 400, "Rows"),
    "bits-stored-over-allocated": (edited("CT_small.dcm", BitsStored=17), "", 400, "BitsStored"),
    "frames-negative": (edited("rtdose.dcm", NumberOfFrames=-3), "", 400, "NumberOfFrames"),
    "no-photometric": (raw_element("CT_small.dcm", "PhotometricInterpretation", "CS", b""), "", 400,
                       "PhotometricInterpretation"),
    "rgb-with-one-sample": (edited("CT_small.dcm", PhotometricInterpretation="RGB"), "", 400, "SamplesPerPixel"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_dicom_values_are_named_4xx_and_audited(served, audit_db, case, capfd):
    """Each was a 500 with a traceback, unaudited (issue 14): now a 4xx naming the element, audited."""
    _, server = served
    data, params, status, words = MALFORMED[case]
    url = f"data:application/dicom{params};base64," + base64.b64encode(data).decode()
    body = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "q"}]}]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error" and error["param"] == "messages"
    assert audit_rows(audit_db, reply) == [(status,)]
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
