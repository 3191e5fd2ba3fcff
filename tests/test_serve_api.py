"""`tinymed serve` API against a real uvicorn server on loopback: the OpenAI protocol (official client,
stream and not), determinism against `generate_answers`, batching, limits and every bad input."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from PIL import Image

from conftest import save_tiny_model
from tinymed.models import generate_answers, load_model
from tinymed.serve.app import STATIC, ServeConfig, create_app
from tinymed.serve.background import BackgroundServer
from tinymed.serve.batching import Batcher, BatchConfig, Failed, Finished, Job, QueueFull
from tinymed.serve.images import ImageLimits
from tinymed.serve.security import UnsafeBindError, bearer_matches, check_bind, is_loopback

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
QUESTION = "Is there a lesion in the left lung?"
KEY = "s3cret-key"


def png_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def user(question: str, url: str | None = None) -> list[dict]:
    parts = [{"type": "text", "text": question}]
    if url:
        parts.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return [{"role": "user", "content": parts}]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, text_layers=2, max_positions=256)
    return load_model(folder, device="cpu")


@pytest.fixture(scope="module")
def image():
    return Image.new("RGB", (96, 80), color=(30, 90, 200))


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory):
    return tmp_path_factory.mktemp("audit") / "audit.sqlite"


@pytest.fixture(scope="module")
def server(lm, audit_path):
    config = ServeConfig(
        model_name="tiny", audit_db=audit_path, max_tokens_limit=300, max_question_chars=200,
        max_body_bytes=300_000, image=ImageLimits(max_bytes=200_000, max_pixels=1_000_000),
    )
    with BackgroundServer(create_app(lm, config)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def post(server, body, **kwargs) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", timeout=60, **({"json": body} | kwargs))


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code:
        assert error["code"] == code
    return error


# ---- protocol and determinism -------------------------------------------------------------------------

def test_health_and_models(server, client):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ready" and health["model"] == "tiny" and health["device"] == "cpu"
    assert health["quant"] == "none" and health["memory"]["rss_bytes"] > 0
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_openai_client_answer_equals_generate_answers(lm, client, image):
    expected = generate_answers(lm, [image], [QUESTION], max_new_tokens=10)[0]
    reply = client.chat.completions.create(model="tiny", messages=user(QUESTION, png_url(image)), max_tokens=10, temperature=0)
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == ("length" if expected.new_tokens == 10 else "stop")
    assert reply.usage.completion_tokens == expected.new_tokens
    assert reply.usage.prompt_tokens > lm.model.config.image_seq_length  # image tokens + the text
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_stream_matches_non_stream(client, image):
    messages = user(QUESTION, png_url(image))
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_sse_wire_format_ends_with_done(server, image):
    body = {"model": "tiny", "messages": user(QUESTION, png_url(image)), "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_text_only_request_uses_a_black_image(lm, client):
    expected = generate_answers(lm, [Image.new("RGB", (64, 64))], ["Grade this answer from 1 to 10."], max_new_tokens=6)
    reply = client.chat.completions.create(
        model="tiny", max_tokens=6, messages=[{"role": "user", "content": "Grade this answer from 1 to 10."}])
    assert reply.choices[0].message.content == expected[0].text


def test_stop_string_cuts_the_answer(client, image):
    messages = user(QUESTION, png_url(image))
    full = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12).choices[0].message.content
    stop = full[3:5]
    cut = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=[stop]).choices[0]
    assert cut.message.content == full[: full.index(stop)].strip()
    assert cut.finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == cut.message.content


def test_concurrent_requests_are_batched_and_answer_like_one_at_a_time(lm, server):
    images = [Image.new("RGB", (64, 64), color=(40 * i, 255 - 30 * i, 90)) for i in range(6)]
    questions = [f"{QUESTION} case {i}" for i in range(6)]
    expected = [a.text for a in generate_answers(lm, images, questions, max_new_tokens=8, batch_size=1)]

    def ask(i):
        r = post(server, {"model": "tiny", "messages": user(questions[i], png_url(images[i])), "max_tokens": 8})
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(ask, range(6))) == expected


def test_sampling_with_temperature_answers(client, image):
    reply = client.chat.completions.create(model="tiny", messages=user(QUESTION, png_url(image)), max_tokens=5,
                                           temperature=0.9)
    assert reply.usage.completion_tokens <= 5 and reply.choices[0].finish_reason in ("stop", "length")


# ---- bad input ------------------------------------------------------------------------------------------

def jpeg_bytes(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


def lying_png(width: int, height: int) -> bytes:
    """A 4×4 PNG whose IHDR claims another size (CRC fixed so only the size lies)."""
    import struct
    import zlib

    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        (data_url(b"just some text, not an image" * 10, "text/plain"), 415, "unsupported_image_format"),
        (data_url(jpeg_bytes()[:1500], "image/jpeg"), 400, "corrupt_image"),
        (data_url(lying_png(50_000, 50_000)), 413, "image_too_large"),
        (data_url(lying_png(300, 300)), 400, "corrupt_image"),
        (data_url(b"GIF89a" + b"\0" * 64, "image/gif"), 415, "unsupported_image_format"),
        ("https://example.org/x.png", 400, "invalid_image_url"),
        ("data:image/png;base64,@@@not-base64@@@", 400, "invalid_image_url"),
        (data_url(b"\0" * 210_000 + jpeg_bytes(), "image/jpeg"), 413, "image_too_large"),
    ],
    ids=["not-an-image", "truncated-jpeg", "png-bomb-header", "png-lying-header", "gif", "http-url", "bad-base64",
         "too-many-bytes"],
)
def test_bad_images_get_clear_errors(server, url, status, code):
    error = assert_error(post(server, {"model": "tiny", "messages": user(QUESTION, url), "max_tokens": 4}), status, code)
    assert error["param"] == "messages"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gpt-4o", "messages": user(QUESTION)}, 404, "model_not_found"),
        ({"model": "tiny"}, 400, "invalid_request"),
        ({"model": "tiny", "messages": user(QUESTION), "max_tokens": 301}, 400, "max_tokens_too_large"),
        ({"model": "tiny", "messages": user("why? " * 100)}, 400, "question_too_long"),
        ({"model": "tiny", "messages": user(QUESTION), "temperature": 3}, 400, "invalid_request"),
        ({"model": "tiny", "messages": user(QUESTION), "n": 2}, 400, "invalid_request"),
        ({"model": "tiny", "messages": user(QUESTION) + [{"role": "assistant", "content": "no"}]}, 400, "unsupported_role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(jpeg_bytes(), "image/jpeg")}}] * 2 + [
            {"type": "text", "text": "q"}]}]}, 400, "too_many_images"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "  "}]}, 400, "empty_question"),
    ],
    ids=["unknown-model", "no-messages", "max-tokens", "long-question", "temperature", "n", "multi-turn",
         "two-images", "empty"],
)
def test_bad_requests_get_openai_errors(server, body, status, code):
    assert_error(post(server, body), status, code)


def test_health_advertises_a_max_tokens_that_fits_the_context(server):
    """The model's context is 256 tokens: the advertised limit is what is left after the shortest prompt,
    not the server's 300; a longer question still meets the context limit when the batch is formed."""
    limit = httpx.get(server.url + "/health").json()["limits"]["max_tokens"]
    assert 200 < limit < 256
    assert post(server, {"model": "tiny", "messages": user("?"), "max_tokens": limit}).status_code == 200
    error = assert_error(post(server, {"model": "tiny", "messages": user("?"), "max_tokens": limit + 1}), 400,
                         "max_tokens_too_large")
    assert "context of 256 tokens" in error["message"]
    assert_error(post(server, {"model": "tiny", "messages": user("why " * 40), "max_tokens": limit}), 400,
                 "context_length_exceeded")


def test_malformed_json_and_oversized_body(server):
    assert_error(post(server, None, content=b"{not json", headers={"content-type": "application/json"}), 400)
    big = {"model": "tiny", "messages": user(QUESTION, data_url(b"x" * 400_000))}
    assert_error(post(server, big), 413, "request_too_large")

    def chunked():  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 10_000

    assert_error(post(server, None, content=chunked()), 413, "request_too_large")


def test_unknown_route_is_an_openai_error(server):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user(QUESTION))
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="tiny", messages=user(QUESTION), max_tokens=10_000)


# ---- page and safety ------------------------------------------------------------------------------------

def test_page_and_assets_are_served_locally(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "Decision support, not a diagnosis" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text, f"{name} must not load anything from the network"
        assert httpx.get(server.url + "/static/" + name).status_code == 200 or name == "index.html"


def test_bind_beyond_loopback_needs_a_key():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(UnsafeBindError, match="API key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", KEY)
    check_bind("127.0.0.1", None)
    assert bearer_matches(f"Bearer {KEY}", KEY) and not bearer_matches("Bearer wrong", KEY)
    assert not bearer_matches(None, KEY) and not bearer_matches(KEY, KEY)


def test_api_key_is_checked_on_every_api_call(lm, image):
    with BackgroundServer(create_app(lm, ServeConfig(api_key=KEY, model_name="tiny"))) as srv:
        assert httpx.get(srv.url + "/health").json()["auth_required"] is True
        assert_error(httpx.get(srv.url + "/v1/models"), 401, "invalid_api_key")
        assert_error(post(srv, {"model": "tiny", "messages": user(QUESTION)}, headers={"authorization": "Bearer no"}), 401)
        assert_error(httpx.post(srv.url + "/api/preview", content=jpeg_bytes()), 401)
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=user(QUESTION), max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_audit_log_keeps_metadata_not_questions(server, client, audit_path):
    client.chat.completions.create(model="tiny", messages=user("audit me please"), max_tokens=3)
    rows = sqlite3.connect(audit_path).execute(
        "SELECT request_id, model, status, latency_ms, prompt_tokens, completion_tokens, question FROM requests").fetchall()
    ok = [r for r in rows if r[2] == 200]
    assert ok and all(r[0].startswith("chatcmpl-") and r[1] == "tiny" and r[3] > 0 and r[4] > 0 for r in ok)
    assert all(r[6] is None for r in rows)
    assert any(r[2] == 404 for r in rows)  # failures are audited too


def test_audit_log_stores_questions_only_when_asked(lm, tmp_path):
    db = tmp_path / "a.sqlite"
    with BackgroundServer(create_app(lm, ServeConfig(model_name="tiny", audit_db=db, audit_questions=True))) as srv:
        post(srv, {"model": "tiny", "messages": user("what modality?"), "max_tokens": 2})
    assert sqlite3.connect(db).execute("SELECT question FROM requests").fetchall() == [("what modality?",)]


def test_client_leaving_mid_stream_frees_its_slot(server, audit_path, image):
    body = {"model": "tiny", "messages": user("leave early", png_url(image)), "max_tokens": 150, "stream": True,
            "stop": ["\u2603"]}  # a stop string never produced: only the disconnect can end it early
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while httpx.get(server.url + "/health").json()["queue"]["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(server.url + "/health").json()["queue"]["running"] == 0
    db = sqlite3.connect(audit_path)
    assert db.execute("SELECT status, completion_tokens FROM requests ORDER BY time DESC LIMIT 1").fetchone() == (499, None)


def test_request_timeout_is_504(lm, image):
    config = ServeConfig(model_name="tiny", request_timeout_s=0.001)
    with BackgroundServer(create_app(lm, config)) as srv:
        assert_error(post(srv, {"model": "tiny", "messages": user(QUESTION), "max_tokens": 50}), 504, "timeout")


# ---- the queue ------------------------------------------------------------------------------------------

def _job(events: list, temperature: float = 0.0) -> Job:
    return Job(image=None, question="q", max_tokens=1, temperature=temperature, stop=[],
               deadline=time.monotonic() + 60, emit=events.append)


def test_batcher_groups_by_sampling_settings_and_bounds_its_queue():
    release, batches = threading.Event(), []

    def run_batch(jobs):
        release.wait(5)
        batches.append([j.temperature for j in jobs])
        for j in jobs:
            j.emit(Finished("ok", "stop", 1, 1))

    batcher = Batcher(run_batch, BatchConfig(max_batch=3, batch_wait_ms=50, max_queue=4))
    events: list = []
    batcher.start()
    try:
        batcher.submit(_job(events))  # taken at once and held by run_batch until released
        time.sleep(0.2)
        for t in (0.0, 0.7, 0.0, 0.0):
            batcher.submit(_job(events, t))
        with pytest.raises(QueueFull):
            batcher.submit(_job(events))
        release.set()
        deadline = time.monotonic() + 5
        while len(events) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.stop()
    assert batches == [[0.0], [0.0, 0.0, 0.0], [0.7]]
    assert all(isinstance(e, Finished) for e in events)


def test_batcher_stop_fails_waiting_jobs():
    batcher = Batcher(lambda jobs: time.sleep(0.3), BatchConfig(max_batch=1))
    events: list = []
    batcher.start()
    batcher.submit(_job(events))
    time.sleep(0.05)
    batcher.submit(_job(events))
    batcher.stop()
    assert [type(e) for e in events] == [Failed] and events[0].status == 503


def test_full_queue_is_503_with_retry_after(lm, image):
    config = ServeConfig(model_name="tiny", batch=BatchConfig(max_batch=1, max_queue=1), retry_after_s=3)
    body = {"model": "tiny", "messages": user(QUESTION, png_url(image)), "max_tokens": 60, "stop": ["\u2603"]}
    with BackgroundServer(create_app(lm, config)) as srv, ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: post(srv, body), range(6)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses[0] == 200 and 503 in statuses and set(statuses) <= {200, 503}
    busy = next(r for r in responses if r.status_code == 503)
    assert busy.headers["retry-after"] == "3" and busy.json()["error"]["code"] == "queue_full"
