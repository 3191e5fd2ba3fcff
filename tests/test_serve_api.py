"""`tinymed serve` API against a real uvicorn server on loopback: the OpenAI protocol (official client,
stream and not), determinism against `generate_answers`, batching, limits and every bad input."""

from __future__ import annotations

import base64
import functools
import io
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from conftest import audit_rows, save_tiny_model
from tinymed.models import generate_answers, load_model
from tinymed.serve.app import STATIC, ServeConfig, create_app
from tinymed.serve.background import BackgroundServer
from tinymed.serve.batching import Batcher, BatchConfig, Failed, Finished, Job, QueueFull
from tinymed.serve.images import ImageError, ImageLimits, decode_image
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
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, text_layers=2, max_positions=256)


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(model_dir, device="cpu")


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


def queue_state(server) -> dict:
    return httpx.get(server.url + "/health").json()["queue"]


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


@pytest.fixture(scope="module")
def eos_first_lm(model_dir):
    """The tiny model rewired to end every answer at once: its layers add nothing, every token embeds alike
    and EOS has the highest logit for that embedding."""
    lm = load_model(model_dir, device="cpu")
    text = lm.model.model.language_model
    with torch.no_grad():
        for layer in text.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        text.embed_tokens.weight.fill_(1.0)
        head = torch.randn_like(lm.model.lm_head.weight) * 0.01
        head[lm.processor.tokenizer.eos_token_id] = 1.0
        lm.model.lm_head.weight = torch.nn.Parameter(head)  # untied from the embedding
    return lm


def test_min_tokens_holds_back_the_end_of_the_answer(eos_first_lm, image):
    body = {"model": "tiny", "messages": user(QUESTION, png_url(image)), "max_tokens": 12}
    with BackgroundServer(create_app(eos_first_lm, ServeConfig(model_name="tiny"))) as server:
        free = post(server, body).json()
        forced = post(server, {**body, "min_tokens": 9}).json()
        too_many = post(server, {**body, "min_tokens": 13})
    assert free["usage"]["completion_tokens"] == 0 and free["choices"][0]["finish_reason"] == "stop"
    assert forced["usage"]["completion_tokens"] == 9 and forced["choices"][0]["finish_reason"] == "stop"
    assert_error(too_many, 400, "min_tokens_too_large")


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
    refused = post(server, {"model": "elsewhere", "messages": user("audit me too")})
    assert audit_rows(audit_path, refused, "status, question") == [(404, None)]  # failures are audited too


def test_every_reply_names_its_audit_row(server, audit_path):
    ok = post(server, {"model": "tiny", "messages": user(QUESTION), "max_tokens": 2})
    refused = post(server, {"model": "elsewhere", "messages": user(QUESTION)})
    assert ok.headers["x-request-id"] == ok.json()["id"] and refused.status_code == 404
    assert audit_rows(audit_path, ok) == [(200,)] and audit_rows(audit_path, refused) == [(404,)]


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
    while queue_state(server)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert queue_state(server)["running"] == 0
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


@pytest.mark.parametrize("run_seconds, expected", [(1.0, [1, 3]), (0.0, [1, 1, 1, 1])])
def test_batcher_waits_for_companions_in_proportion_to_its_batches(run_seconds, expected):
    """After a slow batch, jobs arriving 20 ms apart share the next one; after an instant batch nobody waits."""
    batches, done = [], threading.Event()

    def run_batch(jobs):
        time.sleep(run_seconds)
        batches.append(len(jobs))
        for j in jobs:
            j.emit(Finished("ok", "stop", 1, 1))
        if sum(batches) == 4:
            done.set()

    batcher = Batcher(run_batch, BatchConfig(max_batch=8, batch_wait_ms=300, wait_share=0.5))
    events: list = []
    batcher.start()
    try:
        batcher.submit(_job(events))  # the first batch (no history: waits batch_wait_ms)
        while not events:
            time.sleep(0.005)
        for _ in range(3):
            batcher.submit(_job(events))
            time.sleep(0.02 if run_seconds else 0.1)
        assert done.wait(10)
    finally:
        batcher.stop()
    assert batches == expected


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


# ---- hostile and odd input (issue 14) -------------------------------------------------------------------

def test_stop_strings_are_capped_in_number_and_length(server, image):
    body = {"model": "tiny", "messages": user(QUESTION, png_url(image)), "max_tokens": 40}
    assert_error(post(server, body | {"stop": ["x" * 257]}), 400, "invalid_stop")
    assert_error(post(server, body | {"stop": ["a", "b", "c", "d", "e"]}), 400, "invalid_stop")
    assert_error(post(server, body | {"stop": ""}), 400, "invalid_stop")
    longest = post(server, body | {"stop": ["\u2603" * 256] * 4})  # the most stop text allowed: answered
    assert longest.status_code == 200, longest.text


@pytest.mark.parametrize(("field", "value"), [("max_tokens", True), ("stream", "yes"), ("temperature", "0.5"),
                                              ("temperature", True), ("n", 1.0), ("stop", 3), ("model", 7),
                                              ("stream_options", {"include_usage": 1})])
def test_request_types_are_strict(server, field, value):
    error = assert_error(post(server, {"model": "tiny", "messages": user(QUESTION), field: value}), 400,
                         "invalid_request")
    assert error["param"].startswith(field)


def test_integer_temperature_and_null_fields_are_valid(server):
    body = {"model": "tiny", "messages": user(QUESTION), "temperature": 0, "max_tokens": None, "stop": None,
            "stream": None, "n": None, "max_completion_tokens": 3, "top_p": 1, "user": "x"}
    assert post(server, body).status_code == 200
    assert post(server, body | {"temperature": 1}).status_code == 200


def test_wrong_method_and_bad_query_are_openai_errors(server):
    error = assert_error(httpx.get(server.url + "/v1/chat/completions"), 405, "method_not_allowed")
    assert error["type"] == "invalid_request_error"
    error = assert_error(httpx.post(server.url + "/api/preview?frame=abc", content=jpeg_bytes()), 400,
                         "invalid_request")
    assert error["param"] == "query.frame"


def test_an_image_in_a_system_message_is_used_not_dropped(client, image):
    url = png_url(image)
    system = [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": url}}]},
              {"role": "user", "content": QUESTION}]
    as_system = client.chat.completions.create(model="tiny", messages=system, max_tokens=8)
    as_user = client.chat.completions.create(model="tiny", messages=user(QUESTION, url), max_tokens=8)
    assert as_system.choices[0].message.content == as_user.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="data: URL"):
        system[0]["content"][0]["image_url"]["url"] = "file:///etc/passwd"
        client.chat.completions.create(model="tiny", messages=system, max_tokens=8)


def test_the_body_must_be_json(server):
    body = json.dumps({"model": "tiny", "messages": user(QUESTION)})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        assert_error(post(server, None, content=body, headers=headers), 415, "unsupported_media_type")
    assert post(server, None, content=body, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200


def test_without_a_key_only_this_machine_may_call(server):
    port = server.port
    assert_error(httpx.get(server.url + "/health", headers={"host": "evil.example"}), 403, "host_not_allowed")
    assert_error(post(server, {"model": "tiny", "messages": user(QUESTION)}, headers={"host": f"rebind.example:{port}"}),
                 403, "host_not_allowed")
    assert_error(post(server, {"model": "tiny", "messages": user(QUESTION)}, headers={"origin": "https://evil.example"}),
                 403, "origin_not_allowed")
    assert_error(httpx.get(server.url + "/health", headers={"origin": "null"}), 403, "origin_not_allowed")
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert httpx.get(server.url + "/health", headers={"host": host, "origin": f"http://{host}"}).status_code == 200


def test_with_a_key_any_host_name_is_served(lm):
    """A LAN bind needs a key; with one, clients reach it under whatever name they use."""
    with BackgroundServer(create_app(lm, ServeConfig(api_key=KEY, model_name="tiny"))) as srv:
        headers = {"host": "tinymed.clinic.lan:8000", "origin": "http://tinymed.clinic.lan:8000",
                   "authorization": f"Bearer {KEY}"}
        assert httpx.get(srv.url + "/v1/models", headers=headers).status_code == 200


def test_pixel_bomb_is_refused_from_its_header():
    """A 6300×6300 PNG of one colour is a few KB and would decode to 120 MB: refused before decoding."""
    buf = io.BytesIO()
    Image.new("L", (6300, 6300)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 100_000
    with pytest.raises(ImageError, match="6300×6300") as info:
        decode_image(buf.getvalue(), ImageLimits())
    assert info.value.status == 413


# ---- a slow engine: deadlines and clients that leave ------------------------------------------------------

SLOW_STEP_S = 0.03


@pytest.fixture(scope="module")
def slow(model_dir, tmp_path_factory):
    """A server whose model takes SLOW_STEP_S per token, one request at a time, one waiting at most."""
    slow_lm = load_model(model_dir, device="cpu")
    forward = slow_lm.model.forward

    @functools.wraps(forward)  # generate() reads forward's signature
    def slowed(*args, **kwargs):
        time.sleep(SLOW_STEP_S)
        return forward(*args, **kwargs)

    slow_lm.model.forward = slowed
    audit = tmp_path_factory.mktemp("slow") / "audit.sqlite"
    config = ServeConfig(model_name="tiny", request_timeout_s=3.0, audit_db=audit,
                         batch=BatchConfig(max_batch=1, max_queue=1))
    with BackgroundServer(create_app(slow_lm, config)) as srv:
        yield srv, audit


LONG = {"model": "tiny", "messages": user(QUESTION), "max_tokens": 200, "stop": ["\u2603"]}  # ≥ 6 s of tokens
SHORT = {"model": "tiny", "messages": user(QUESTION), "max_tokens": 2}


def wait_idle(server, within_s: float) -> dict:
    deadline = time.monotonic() + within_s
    while (queue := queue_state(server))["running"] + queue["waiting"]:
        assert time.monotonic() < deadline, f"server still busy: {queue}"
        time.sleep(0.02)
    return queue


def test_deadline_frees_the_worker(slow):
    server, _ = slow
    t0 = time.monotonic()
    assert_error(post(server, LONG), 504, "timeout")
    assert time.monotonic() - t0 < 3.0 + 1.0 + 1.0
    wait_idle(server, within_s=0.5)  # the row stopped at its deadline; it does not run on unseen
    assert post(server, SHORT).status_code == 200


def test_client_leaving_while_queued_frees_its_place(slow):
    server, audit = slow
    wait_idle(server, within_s=5)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server, LONG)  # holds the worker until its deadline
        deadline = time.monotonic() + 5
        while queue_state(server)["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(httpx.ReadTimeout):  # queued behind the running request; gives up
            httpx.post(server.url + "/v1/chat/completions", json=SHORT | {"messages": user("I leave")}, timeout=0.3)
        deadline = time.monotonic() + 0.5
        while (queue := queue_state(server))["waiting"]:
            assert time.monotonic() < deadline, "the place of the client that left is still taken"
            time.sleep(0.01)
        assert queue["running"] == 1  # still the first request: the one that left was never started
        assert post(server, SHORT).status_code == 200  # the one place in the queue was free again
        assert running.result().status_code == 504
    rows = sqlite3.connect(audit).execute("SELECT status, completion_tokens FROM requests ORDER BY time").fetchall()
    assert rows[-3:] == [(499, None), (504, None), (200, 2)]


def post_while_the_queue_is_full(server, body) -> httpx.Response | None:
    """Fill the one-slot queue behind a running request, then post `body`.

    Returns its answer when the queue was seen full before and after it, None when the timing missed
    (under load the running request can reach its deadline before the second one queues).
    """
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server, LONG)  # holds the worker until its 3 s deadline
        deadline = time.monotonic() + 5
        while queue_state(server)["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        waiting = pool.submit(post, server, LONG | {"max_tokens": 60, "min_tokens": 60})
        while queue_state(server)["waiting"] == 0:
            if running.done():
                return None
            time.sleep(0.01)
        answer = post(server, body)
        after = queue_state(server)
        full_throughout = after["running"] == 1 and after["waiting"] == 1  # no request ended meanwhile
        assert {running.result().status_code, waiting.result().status_code} <= {200, 504}  # 504 on a slow machine
    return answer if full_throughout else None


def test_full_queue_is_refused_before_the_image_is_decoded(slow):
    """The place in the queue is taken first: a full queue answers 503 even to a corrupt image."""
    server, _ = slow
    corrupt = user(QUESTION, data_url(jpeg_bytes()[:1500], "image/jpeg"))
    for _ in range(3):
        wait_idle(server, within_s=5)
        if (answer := post_while_the_queue_is_full(server, {"model": "tiny", "messages": corrupt})) is not None:
            break
    else:
        pytest.fail("the queue was never seen full for a whole request in 3 tries")
    assert_error(answer, 503, "queue_full")
    wait_idle(server, within_s=5)
    assert_error(post(server, {"model": "tiny", "messages": corrupt}), 400, "corrupt_image")
