"""Property-based fuzzing of `tinymed serve` (Hypothesis), against the real app on a real socket, once per
engine it serves (fp32 and every quantization backend installed for CPU).

What is fuzzed: the request schema (every field with right and wrong JSON types, raw bytes, content
types, origins), data URLs and image bytes (MIME types, parameters, base64, mutated PNG/JPEG, lying
headers), structured DICOM mutations (every element the decoder reads set missing, empty, zero,
negative, huge, to another VR, to text or to garbage bytes), and clients that leave at any point.

Invariants, for every request: never a 500 (503 shedding and 504 past the deadline are designed
answers), an OpenAI error object whenever it is not 200, the answer or the error within the deadline, one
audit row per chat completion, no traceback in the log, and an idle server (nothing waiting or running)
once the clients have gone — within one model step of the deadline, at most `DRAIN_S` later.

Bounded for CI by default (`FUZZ_EXAMPLES` per property and engine, fixed seed); for a long run set
`TINYMED_FUZZ_EXAMPLES=N` (then seeds are random), e.g.
`TINYMED_FUZZ_EXAMPLES=2000 .venv/bin/python -m pytest -q tests/test_serve_fuzz.py`.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from conftest import save_tiny_model
from tinymed.quantize import available_methods, load_for_inference
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer
from tinymed.serve.batching import BatchConfig
from tinymed.serve.calls import DEADLINE_GRACE_S
from tinymed.serve.images import ImageLimits

FUZZ_EXAMPLES = 8
EXAMPLES = int(os.environ.get("TINYMED_FUZZ_EXAMPLES", FUZZ_EXAMPLES))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="TINYMED_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ENGINES = ["none", *available_methods("cpu")]
TIMEOUT_S = 5.0
ANSWER_WITHIN_S = TIMEOUT_S + DEADLINE_GRACE_S + 2.0  # the deadline, its grace, and a loaded 2-core machine
DRAIN_S = 30.0  # a row stops at its next model step; one step of a float32 int4 model on a starved core is slow
MODEL = "tiny"
CHAT = "/v1/chat/completions"


# ---- the servers ---------------------------------------------------------------------------------------

class Tracebacks(logging.Handler):
    """Collects every log record that carries a traceback, and uncaught thread exceptions."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            self.seen.append(self.format(record))


@dataclass
class Fuzzed:
    url: str
    audit: sqlite3.Connection
    tracebacks: Tracebacks
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self) -> tuple[int, int]:
        """(audit rows, tracebacks) so far: what `check_server` compares against."""
        return self.audit.execute("SELECT COUNT(*) FROM requests").fetchone()[0], len(self.tracebacks.seen)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    texts = ["is there a lesion? yes no", "what modality is this? ct mri x-ray"] * 30
    return save_tiny_model(tmp_path_factory.mktemp("fuzz-model"), texts, text_layers=1, max_positions=128)


@pytest.fixture(scope="module", params=ENGINES)
def served(request, model_dir, tmp_path_factory):
    lm = load_for_inference(str(model_dir), device="cpu", quant=None if request.param == "none" else request.param)
    db = tmp_path_factory.mktemp("fuzz-audit") / "audit.sqlite"
    config = ServeConfig(model_name=MODEL, audit_db=db, request_timeout_s=TIMEOUT_S, max_tokens_limit=8,
                         max_body_bytes=4 * 2**20, image=ImageLimits(max_bytes=2 * 2**20, max_pixels=1_000_000),
                         batch=BatchConfig(max_batch=4, max_queue=8))
    server = BackgroundServer(create_app(lm, config))  # configures uvicorn's loggers: watch them after this
    tracebacks = Tracebacks()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    for logger in loggers:
        logger.addHandler(tracebacks)
    hook = threading.excepthook
    threading.excepthook = lambda args: tracebacks.seen.append(f"thread {args.thread}: {args.exc_value!r}")
    try:
        with server:
            yield Fuzzed(server.url, sqlite3.connect(db), tracebacks)
    finally:
        threading.excepthook = hook
        for logger in loggers:
            logger.removeHandler(tracebacks)


# ---- invariants ----------------------------------------------------------------------------------------

def check_answer(status: int, body: bytes, seconds: float) -> None:
    """Never a 500; an OpenAI error object unless 200; within the deadline."""
    assert status < 500 or status in (503, 504), (status, body[:300])
    if status != 200:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
    assert seconds < ANSWER_WITHIN_S, f"answered after {seconds:.1f} s"


def check_server(fuzzed: Fuzzed, mark: tuple[int, int], requests: int) -> None:
    """Since `mark`: every chat completion audited once, no traceback logged; and nothing left waiting or
    running."""
    deadline = time.monotonic() + DRAIN_S
    while True:
        queue = httpx.get(fuzzed.url + "/health").json()["queue"]
        audited = fuzzed.mark()[0] - mark[0]
        if (queue["waiting"], queue["running"], audited) == (0, 0, requests):
            break
        assert time.monotonic() < deadline, f"queue {queue}, audited {audited} of {requests}"
        time.sleep(0.02)
    assert not fuzzed.tracebacks.seen[mark[1]:], fuzzed.tracebacks.seen[mark[1]]


def send(fuzzed: Fuzzed, path: str, content: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    t0 = time.monotonic()
    with httpx.Client(timeout=ANSWER_WITHIN_S + 5) as http, \
            http.stream("POST", fuzzed.url + path, content=content, headers=headers) as r:
        body = r.read()
    check_answer(r.status_code, body, time.monotonic() - t0)
    return r.status_code, body


def chat(fuzzed: Fuzzed, body: bytes, headers: dict[str, str] | None = None) -> int:
    """One chat completion, checked; returns its status."""
    with fuzzed.lock:
        mark = fuzzed.mark()
        status, _ = send(fuzzed, CHAT, body, {"content-type": "application/json"} | (headers or {}))
        check_server(fuzzed, mark, 1)
    return status


def ask_about(url: str, **fields) -> bytes:
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "is there a lesion?"}]
    return json.dumps({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": content}]}
                      | fields).encode()


def data_url(data: bytes, mime: str = "image/png", params: tuple[str, ...] = ()) -> str:
    return f"data:{';'.join((mime, *params))};base64," + base64.b64encode(data).decode()


def check_image(fuzzed: Fuzzed, data: bytes, url: str, frame: str | None = None) -> None:
    """The same bytes through the page's preview (raw body) and the API (data URL)."""
    query = "" if frame is None else "?frame=" + frame
    with fuzzed.lock:
        mark = fuzzed.mark()
        send(fuzzed, "/api/preview" + query, data, {"content-type": "application/octet-stream"})
        check_server(fuzzed, mark, 0)
    chat(fuzzed, ask_about(url))


# ---- the request schema --------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=6)
urls = st.sampled_from(["file:///etc/passwd", "http://127.0.0.1/x.png", "data:image/png;base64,@@", "data:,",
                        "data:image/png,raw"]) | st.text(max_size=40)
parts = (st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=60)})
         | st.fixed_dictionaries({"type": st.just("image_url"),
                                  "image_url": st.fixed_dictionaries({"url": urls}, optional={"detail": json_values})})
         | json_values)
messages = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | json_values,
    "content": st.text(max_size=80) | st.lists(parts, max_size=3) | json_values,
})
request_bodies = st.fixed_dictionaries(
    {"model": st.just(MODEL) | json_values, "messages": st.lists(messages, max_size=3) | json_values},
    optional={
        "stream": st.booleans() | json_values, "stream_options": st.just({"include_usage": True}) | json_values,
        "max_tokens": st.integers(-2, 12) | json_values, "max_completion_tokens": st.integers(-2, 12) | json_values,
        "temperature": st.floats(-1, 3) | st.integers(0, 2) | json_values, "n": st.integers(0, 2) | json_values,
        "stop": st.text(max_size=300) | st.lists(st.text(max_size=20), max_size=6) | json_values,
        "top_p": json_values, "user": json_values,
    },
)
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/x-www-form-urlencoded", ""])
origins = st.sampled_from([None, "http://localhost", "http://127.0.0.1:9", "https://evil.example", "null"])


@FUZZ
@given(body=request_bodies, content_type=content_types, origin=origins)
def test_any_request(served, body, content_type, origin):
    headers = {"content-type": content_type} | ({"origin": origin} if origin else {})
    chat(served, json.dumps(body).encode(), headers)


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_any_body_bytes(served, raw):
    chat(served, raw)


# ---- data URLs and image bytes -------------------------------------------------------------------------

def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _seed_images() -> list[bytes]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated
    return [
        _encoded(rgb, "PNG"), _encoded(rgb, "JPEG"), _encoded(rgb.convert("L"), "PNG"),
        _encoded(rgb.convert("RGBA"), "PNG"), _encoded(rgb.convert("P"), "PNG"), _encoded(rgb, "JPEG", exif=exif),
        _encoded(Image.fromarray(np.arange(0, 65536, 32, dtype=np.uint16).reshape(32, 64)), "PNG"),
        _encoded(Image.new("L", (2000, 2000)), "PNG"),  # a pixel bomb for these limits (4 MP > 1 MP)
    ]


SEED_IMAGES = _seed_images()


def _mutate(data: bytes, flips: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for position, value in flips:
        buf[position % len(buf)] = value
    return bytes(buf[:cut]) if cut is not None else bytes(buf)


def _lying_png(width: int, height: int) -> bytes:
    import zlib

    data = bytearray(SEED_IMAGES[0])
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


image_bytes = (
    st.sampled_from(SEED_IMAGES)
    | st.builds(_mutate, st.sampled_from(SEED_IMAGES),
                st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=6),
                st.none() | st.integers(0, 3000))
    | st.builds(_lying_png, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1))
    | st.binary(max_size=600)
)
mimes = st.sampled_from(["image/png", "image/jpeg", "application/dicom", "application/octet-stream", "text/plain",
                         "IMAGE/PNG", ""]) | st.text(max_size=12)
url_params = st.lists(st.sampled_from(["frame=0", "frame=1", "frame=\u00b2", "frame=\u0663", "frame=-1", "frame=",
                                       "frame=" + "9" * 40, "frame", "charset=utf-8"]) | st.text(max_size=10), max_size=3)


@FUZZ
@given(data=image_bytes, mime=mimes, params=url_params, mangle=st.sampled_from(["", "no-base64", "bad-padding"]))
def test_any_image(served, data, mime, params, mangle):
    url = data_url(data, mime, tuple(params))
    if mangle == "no-base64":
        url = url.replace(";base64,", ",", 1)
    elif mangle == "bad-padding":
        url = url.rstrip("=") + "="
    check_image(served, data, url)


# ---- structured DICOM mutations ------------------------------------------------------------------------

PIXEL_MODULE = ["Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored", "HighBit",
                "PixelRepresentation", "PlanarConfiguration", "PhotometricInterpretation", "PixelData"]
LUTS = ["RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth", "VOILUTFunction",
        "ModalityLUTSequence", "VOILUTSequence"]
PALETTE = [f"{c}PaletteColorLookupTable{p}" for c in ("Red", "Green", "Blue") for p in ("Descriptor", "Data")]
DESCRIPTIVE = ["Modality", "SOPClassUID"]
LUT_ITEMS = [(seq, kw) for seq in ("ModalityLUTSequence", "VOILUTSequence") for kw in ("LUTDescriptor", "LUTData")]
KINDS = ["missing", "empty", "zero", "negative", "huge", "wrong-vr", "text", "garbage"]


def _with_luts() -> bytes:
    """CT_small with a modality LUT and a VOI LUT sequence (each one item), so their items can be mutated."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("RescaleSlope", "RescaleIntercept"):
        if keyword in ds:
            delattr(ds, keyword)
    modality, voi = Dataset(), Dataset()
    modality.add_new("LUTDescriptor", "US", [256, 0, 16])
    modality.add_new("LUTData", "US", list(range(0, 4096, 16)))
    modality.ModalityLUTType = "HU"
    voi.add_new("LUTDescriptor", "US", [256, 0, 8])
    voi.add_new("LUTData", "US", list(range(256)))
    ds.ModalityLUTSequence, ds.VOILUTSequence = Sequence([modality]), Sequence([voi])
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


BASES = {name: open(get_testdata_file(name), "rb").read()
         for name in ("CT_small.dcm", "MR_small.dcm", "examples_palette.dcm", "rtdose.dcm", "SC_rgb_rle_16bit.dcm")}
BASES["lut"] = _with_luts()


def _payload(kind: str, vr: str) -> tuple[str, bytes]:
    """(VR, value bytes) of one mutation kind for an element whose dictionary VR is `vr`."""
    numbers = {"zero": 0, "negative": -1, "huge": 2**31 - 1}
    if kind == "empty":
        return vr, b""
    if kind == "text":
        return vr, b"abc\xb2"
    if kind == "garbage":
        return vr, b"\xff\x00\xfe"
    if kind == "wrong-vr":
        return ("LO", b"wide ") if vr in ("US", "SS", "UL", "SL", "FD", "FL", "DS", "IS") else ("FD", struct.pack("<d", 1.5))
    n = numbers[kind]
    if vr in ("US", "UL", "SS", "SL"):
        fmt = {"US": "<H", "SS": "<h", "UL": "<I", "SL": "<i"}[vr]
        n = {"US": n % 2**16, "UL": n % 2**32}.get(vr, max(min(n, 2**15 - 1), -(2**15)) if vr == "SS" else n)
        return vr, struct.pack(fmt, n)
    if vr in ("FD", "FL"):
        return vr, struct.pack("<d" if vr == "FD" else "<f", float("inf") if kind == "huge" else float(n))
    if vr in ("DS", "IS"):
        text = {"huge": "1e308" if vr == "DS" else "99999999999"}.get(kind, str(n))
        return vr, (text + " " * (len(text) % 2)).encode()
    if vr in ("OB", "OW"):
        return "OW", struct.pack("<h", n % 2**15)
    return (vr if vr in ("CS", "LO", "UI", "SH") else "LO"), (str(n) + " " * (len(str(n)) % 2)).encode()


def _set(ds: Dataset, keyword: str, kind: str) -> None:
    tag = Tag(tag_for_keyword(keyword))
    if kind == "missing":
        ds.pop(tag, None)
        return
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr == "SQ":  # a sequence: emptied, one empty item, or a non-sequence value
        value = {"empty": Sequence([]), "zero": Sequence([Dataset()])}.get(kind)
        if value is not None:
            setattr(ds, keyword, value)
            return
        vr = "LO"
    vr, payload = _payload(kind, vr)
    ds[tag] = RawDataElement(tag, vr, len(payload), payload, 0, False, True)


mutations = st.lists(
    st.tuples(st.sampled_from(PIXEL_MODULE + LUTS + PALETTE + DESCRIPTIVE) | st.sampled_from(LUT_ITEMS),
              st.sampled_from(KINDS)),
    min_size=1, max_size=3,
)


def mutated_dicom(base: str, changes: list[tuple]) -> bytes | None:
    ds = pydicom.dcmread(io.BytesIO(BASES[base]))
    for target, kind in sorted(changes, key=lambda c: not isinstance(c[0], tuple)):  # items before their sequence
        if isinstance(target, tuple):
            sequence, keyword = target
            if sequence not in ds or not isinstance(ds[sequence].value, Sequence) or not ds[sequence].value:
                continue
            _set(ds[sequence].value[0], keyword, kind)
        else:
            _set(ds, target, kind)
    buf = io.BytesIO()
    try:
        ds.save_as(buf, enforce_file_format=False)
    except Exception:  # pydicom refuses to write this combination: nothing to send
        return None
    return buf.getvalue()


@FUZZ
@given(base=st.sampled_from(sorted(BASES)), changes=mutations, frame=st.none() | st.sampled_from(["0", "3", "-1", "x"]))
def test_any_dicom(served, base, changes, frame):
    data = mutated_dicom(base, changes)
    if data is None:
        return
    params = () if frame is None else (f"frame={frame}",)
    check_image(served, data, data_url(data, "application/dicom", params), frame)


def _with_transfer_syntax(data: bytes, uid: bytes) -> bytes:
    """A DICOM file with another TransferSyntaxUID in its file meta (any bytes; the group length fixed)."""
    at = data.index(b"\x02\x00\x10\x00UI")
    old_length = struct.unpack("<H", data[at + 6:at + 8])[0]
    uid += b"\0" * (len(uid) % 2)
    patched = data[:at + 6] + struct.pack("<H", len(uid)) + uid + data[at + 8 + old_length:]
    group_length = struct.unpack("<I", data[140:144])[0] + len(uid) - old_length
    return patched[:140] + struct.pack("<I", group_length) + patched[144:]


@FUZZ
@example(uid=b"1.2.840.10008.1.2.1\\1.2")  # found by this suite: two values, a 500 until fixed
@given(uid=st.sampled_from([b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.5",
                            b"1.2.840.10008.1.2.4.80", b"1.2.3", b"", b"not a uid", b"9" * 80]) | st.binary(max_size=70))
def test_any_transfer_syntax(served, uid):
    data = _with_transfer_syntax(BASES["MR_small.dcm"], uid)
    check_image(served, data, data_url(data, "application/dicom"))


# ---- clients that leave --------------------------------------------------------------------------------

def _leave(url: str, body: bytes, stream: bool, patience_s: float) -> None:
    """Send a request and go away: after the first streamed line, or after `patience_s` of waiting."""
    try:
        with httpx.Client(timeout=patience_s) as http, http.stream(
                "POST", url + CHAT, content=body, headers={"content-type": "application/json"}) as r:
            if stream:
                next(r.iter_lines(), None)
    except httpx.TimeoutException:
        pass


@FUZZ
@given(busy=st.integers(0, 6), leavers=st.lists(st.tuples(st.booleans(), st.floats(0.1, 0.6)), min_size=1, max_size=4))
def test_clients_that_leave_free_their_place(served, busy, leavers):
    """`busy` requests run to the end beside clients that leave (streaming or not, at once or later);
    afterwards every request is audited and nothing is left waiting or running."""
    body = {"model": MODEL, "max_tokens": 8, "stop": ["\u2603"], "messages": [{"role": "user", "content": "lesion?"}]}
    with served.lock:
        mark = served.mark()
        with ThreadPoolExecutor(busy + len(leavers)) as pool:
            answered = [pool.submit(send, served, CHAT, json.dumps(body | {"stream": i % 2 == 1}).encode(),
                                    {"content-type": "application/json"}) for i in range(busy)]
            for stream, patience in leavers:
                pool.submit(_leave, served.url, json.dumps(body | {"stream": stream}).encode(), stream, patience)
            assert all(a.result()[0] in (200, 503, 504) for a in answered)
        check_server(served, mark, busy + len(leavers))
