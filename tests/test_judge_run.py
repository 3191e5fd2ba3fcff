"""Judge runs against a real chat-completions server on loopback that misbehaves on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image
from typer.testing import CliRunner

from conftest import save_tiny_model
from tinymed.cli import app as cli_app
from tinymed.evaluate.judge import ChatClient, EndpointConfig, JudgeConfig, RequestFailed, Usage, run_judge
from tinymed.evaluate.judge.client import ResponseCache

REPO = Path(__file__).resolve().parents[1]
USAGE = {"prompt_tokens": 100, "completion_tokens": 10, "total_tokens": 110}


class FakeJudge:
    """Chat-completions behaviour scripted by markers in the reviewed answer (Assistant 2).

    RATE: first call 429 with Retry-After 0.2 s; FAIL500: first call 500; SLOW: first call sleeps 1 s;
    GARBLE: never a score; GARBLE_ONCE: first reply unparseable; ALWAYS500; BAD400;
    otherwise "8 {n}" where the answer says score=n (default 6). Answer requests (no system message)
    get "generated answer"; reference requests get "judge reference".
    """

    def __init__(self):
        self.reset()

    def reset(self, delay_s: float = 0.0):
        self.calls: list[dict] = []
        self.counts: Counter = Counter()
        self.delay_s = delay_s
        self.in_flight = 0
        self.max_in_flight = 0

    async def handle(self, body: dict):
        messages = body["messages"]
        key = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()
        self.counts[key] += 1
        n = self.counts[key]
        self.calls.append({"key": key, "messages": messages, "time": time.monotonic(), "n": n})
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
            return await self._reply(messages, n)
        finally:
            self.in_flight -= 1

    async def _reply(self, messages: list[dict], n: int):
        if messages[0]["role"] != "system":
            return completion("generated answer score=7")
        user = messages[-1]["content"]
        if "[Assistant 2]" not in user:
            return completion("judge reference")
        answer = user.split("[Assistant 2]\n", 1)[1].split("\n\n[End of Assistant 2]")[0]
        if "RATE" in answer and n == 1:
            return error(429, {"Retry-After": "0.2"})
        if ("FAIL500" in answer and n == 1) or "ALWAYS500" in answer:
            return error(500)
        if "BAD400" in answer:
            return error(400)
        if "SLOW" in answer and n == 1:
            await asyncio.sleep(1.0)
        if "GARBLE" in answer and (n == 1 or "GARBLE_ONCE" not in answer):
            return completion("I would rather not give numbers.")
        score = re.search(r"score=(\d+)", answer)
        return completion(f"8 {score[1] if score else 6}\nAssistant 1 is more complete.")


def completion(text: str) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "fake-judge",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": USAGE,
    }


def error(status: int, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": f"injected {status}", "type": "test", "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


@pytest.fixture(scope="module")
def server():
    fake = FakeJudge()
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        return await fake.handle(await request.json())

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(api, log_level="warning", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    yield fake
    uv.should_exit = True
    thread.join(timeout=5)


@pytest.fixture
def fake(server):
    server.reset()
    return server


def write_questions(path: Path, n: int) -> Path:
    """A LLaVA-Med-format question file: item i is conversation/CT when even, description/MRI when odd."""
    rows = [
        {
            "question_id": i, "image": f"fig{i}.png", "pair_id": f"p{i}", "text": f"Question {i}?\n<image>",
            "gpt4_answer": f"Reference answer {i}.", "fig_caption": f"Caption {i}.", "fig_label": f"Fig. {i}",
            "in_text_mention": [{"tokens": f"Mention {i}."}],
            "domain": {"chest_xray": False, "mri": i % 2 == 1, "histology": False, "gross": False, "ct_scan": True},
            "type": "conversation" if i % 2 == 0 else "detailed_description",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_predictions(path: Path, answers: list[str]) -> Path:
    path.write_text("".join(json.dumps({"question_id": i, "prediction": a}) + "\n" for i, a in enumerate(answers)))
    return path


def judge_config(fake: FakeJudge, tmp_path: Path, **overrides) -> JudgeConfig:
    endpoint = EndpointConfig(
        base_url=fake.url, model="fake-judge", api_key="k", concurrency=4, timeout_s=0.3, max_attempts=3,
        backoff_base_s=0.01,
    )
    fields = dict(
        questions=str(tmp_path / "q.jsonl"), answers=str(tmp_path / "pred.jsonl"), out=str(tmp_path / "out"),
        judge=endpoint, price_in=1.0, price_out=2.0, model_name="tiny",
    )
    return JudgeConfig(**{**fields, **overrides})


FAULTY = ["RATE score=4", "FAIL500 score=8", "SLOW score=2", "GARBLE", "GARBLE_ONCE score=5", "score=6", "plain"]


def test_faults_are_retried_counted_and_a_second_run_is_all_cache(fake, tmp_path):
    write_questions(tmp_path / "q.jsonl", len(FAULTY))
    write_predictions(tmp_path / "pred.jsonl", FAULTY)
    config = judge_config(fake, tmp_path)
    result = run_judge(config)

    calls_per_item = [sum(f"[Assistant 2]\n{a}\n\n" in c["messages"][1]["content"] for c in fake.calls) for a in FAULTY]
    assert calls_per_item == [2, 2, 2, 2, 2, 1, 1]  # GARBLE: its reply once, then one re-ask
    rate = [c["time"] for c in fake.calls if "RATE" in c["messages"][1]["content"]]
    assert rate[1] - rate[0] >= 0.19  # Retry-After honoured (the backoff base is 0.01 s)

    by_id = {r.id: r for r in result.reviews}
    assert by_id["3"].scores is None and "no score pair" in by_id["3"].error and by_id["3"].judge_calls == 2
    assert by_id["4"].scores == {"reference": 8.0, "model": 5.0} and by_id["4"].judge_calls == 2
    assert [by_id[str(i)].scores["model"] for i in (0, 1, 2, 5, 6)] == [4.0, 8.0, 2.0, 6.0, 6.0]
    assert result.summary.reference_sources == {"gpt4_answer": len(FAULTY)}

    summary = result.summary
    assert summary.failures == 1 and summary.groups["overall"].failures == 1
    assert summary.requests == 12 and summary.retries == 3 and summary.cached == 0
    assert summary.usage.prompt_tokens == 100 * 9 and summary.usage.completion_tokens == 10 * 9
    assert summary.cost_usd == pytest.approx((900 * 1.0 + 90 * 2.0) / 1e6)
    # model scores per item: 4, 8, 2, -, 5, 6, 6 against 8 each
    overall = summary.groups["overall"]
    assert overall.n == 6 and overall.relative_score == pytest.approx((4 + 8 + 2 + 5 + 6 + 6) / 6 / 8 * 100)
    conversation = summary.groups["conversation"]  # ids 0, 2, 4, 6
    assert conversation.n == 4 and conversation.model_mean == pytest.approx((4 + 2 + 5 + 6) / 4)

    saved = json.loads(Path(result.summary_path).read_text())
    assert saved["failures"] == 1 and saved["groups"]["mri"]["n"] == 2
    lines = Path(result.reviews_path).read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [str(i) for i in range(len(FAULTY))]

    fake.reset()
    again = run_judge(config)
    assert fake.calls == [] and again.summary.requests == 0
    assert again.summary.cached == 9 and again.summary.usage_cached.total_tokens == 9 * 110
    assert again.summary.cost_usd == 0.0
    assert [r.scores for r in again.reviews] == [r.scores for r in result.reviews]
    assert again.summary.groups == summary.groups


def test_exhausted_and_non_retryable_errors_raise_request_failed(fake):
    endpoint = EndpointConfig(base_url=fake.url, model="m", max_attempts=3, backoff_base_s=0.01, timeout_s=2)

    async def ask(answer: str):
        async with ChatClient(endpoint) as client:
            messages = [{"role": "system", "content": "s"}, {"role": "user", "content": f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]"}]
            with pytest.raises(RequestFailed) as info:
                await client.complete(messages)
            return client.stats, str(info.value)

    stats, message = asyncio.run(ask("ALWAYS500"))
    assert (stats.requests, stats.retries, stats.failed) == (3, 2, 1) and "HTTP 500" in message
    stats, message = asyncio.run(ask("BAD400"))
    assert (stats.requests, stats.retries) == (1, 0) and "HTTP 400" in message


def test_backoff_is_exponential_with_jitter_and_capped():
    endpoint = EndpointConfig(base_url="http://unused/v1", model="m", backoff_base_s=0.5, backoff_max_s=3.0)
    client = ChatClient(endpoint, jitter=lambda: 1.0)
    assert [client._backoff_s(n, None) for n in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert client._backoff_s(0, 2.5) == 2.5 and client._backoff_s(0, 99.0) == 3.0
    assert ChatClient(endpoint, jitter=lambda: 0.25)._backoff_s(2, None) == 0.5


def test_a_killed_run_resumes_asking_only_what_is_missing(fake, tmp_path):
    n = 12
    write_questions(tmp_path / "q.jsonl", n)
    write_predictions(tmp_path / "pred.jsonl", [f"answer {i} score={i % 9 + 1}" for i in range(n)])
    out = tmp_path / "out"
    fake.reset(delay_s=0.15)
    command = [
        sys.executable, "-c", "from tinymed.cli import main; main()", "judge", "--questions", str(tmp_path / "q.jsonl"),
        "--answers", str(tmp_path / "pred.jsonl"), "--out", str(out), "--judge-url", fake.url,
        "--judge-model", "fake-judge", "--concurrency", "1",
    ]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = out / "judge_cache.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (not cache.exists() or len(cache.read_text().splitlines()) < 4):
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    done = {json.loads(line)["key"] for line in cache.read_text().splitlines()}
    assert 4 <= len(done) < n and not (out / "judge_summary.json").exists()

    fake.reset(delay_s=0.05)
    config = judge_config(fake, tmp_path, judge=EndpointConfig(base_url=fake.url, model="fake-judge", concurrency=3))
    result = run_judge(config)
    assert result.summary.cached == len(done) and result.summary.requests == n - len(done)
    assert len(fake.calls) == n - len(done) and 1 < fake.max_in_flight <= 3
    assert {r.prompt_hash for r in result.reviews} == {json.loads(x)["key"] for x in cache.read_text().splitlines()}
    assert result.summary.failures == 0 and result.summary.groups["overall"].n == n


def test_cli_prints_the_table_and_writes_both_files(fake, tmp_path):
    write_questions(tmp_path / "q.jsonl", 4)
    write_predictions(tmp_path / "pred.jsonl", ["score=4", "score=6", "GARBLE", "score=8"])
    out = tmp_path / "out"
    args = [
        "judge", "--questions", str(tmp_path / "q.jsonl"), "--answers", str(tmp_path / "pred.jsonl"),
        "--out", str(out), "--judge-url", fake.url, "--judge-model", "fake-judge", "--backoff-base", "0.01",
        "--price-in", "1", "--price-out", "2", "--model-name", "TinyMed-test",
    ]
    result = CliRunner().invoke(cli_app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for label in ("Conv.", "Desc.", "MRI", "CT", "Overall", "TinyMed-test"):
        assert label in result.output
    assert "failures 1" in result.output
    summary = json.loads((out / "judge_summary.json").read_text())
    assert set(summary) >= {"groups", "failures", "requests", "cached", "usage", "cost_usd"}
    assert list(summary["groups"]) == ["conversation", "detailed_description", "mri", "ct_scan", "overall"]
    assert summary["groups"]["conversation"]["relative_score"] == pytest.approx(50.0)  # 4/8 (id 2 failed)
    assert summary["groups"]["overall"]["ratio_of_means"] == pytest.approx((4 + 6 + 8) / 3 / 8 * 100)
    reviews = [json.loads(line) for line in (out / "reviews.jsonl").read_text().splitlines()]
    assert reviews[0]["groups"] == ["conversation", "ct_scan"] and reviews[1]["groups"] == ["detailed_description", "mri"]
    assert reviews[0]["raw_reply"].startswith("8 4") and len(reviews[0]["prompt_hash"]) == 64
    assert reviews[2]["scores"] is None and reviews[2]["error"]


def test_cli_reports_bad_input_without_a_traceback(fake, tmp_path):
    args = ["judge", "--questions", str(tmp_path / "absent.jsonl"), "--answers", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "out"), "--judge-url", fake.url, "--judge-model", "m"]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 1 and "judge:" in result.output and "absent.jsonl" in result.output


def test_answers_generated_by_an_endpoint_with_the_image(fake, tmp_path):
    write_questions(tmp_path / "q.jsonl", 2)
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "fig0.png")  # fig1.png is absent
    endpoint = EndpointConfig(base_url=fake.url, model="answerer", max_tokens=64)
    config = judge_config(fake, tmp_path, answers=None, answer_endpoint=endpoint, image_root=str(tmp_path))
    result = run_judge(config)
    answer_calls = [c["messages"] for c in fake.calls if c["messages"][0]["role"] == "user"]
    assert len(answer_calls) == 2
    contents = sorted((m[0]["content"] for m in answer_calls), key=lambda c: isinstance(c, str))
    assert contents[0][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert contents[0][1] == {"type": "text", "text": "Question 0?"}
    assert contents[1] == "Question 1?"
    assert [r.answer for r in result.reviews] == ["generated answer score=7"] * 2
    assert [r.scores["model"] for r in result.reviews] == [7.0, 7.0]
    assert result.summary.model_name == "tiny" and result.summary.requests == 2  # judge requests only


def test_caption_items_without_gpt4_answer_get_a_judge_written_reference(fake, tmp_path):
    path = write_questions(tmp_path / "q.jsonl", 2)
    rows = [{k: v for k, v in json.loads(line).items() if k != "gpt4_answer"} for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "pred.jsonl").write_text(json.dumps({"question_id": 0, "prediction": "score=3"}) + "\n")
    result = run_judge(judge_config(fake, tmp_path))
    first, second = result.reviews
    assert first.reference_source == "generated" and first.reference == "judge reference"
    assert first.scores == {"reference": 8.0, "model": 3.0}
    assert second.error == "no model answer for this id" and result.summary.failures == 1
    assert result.summary.reference_sources == {"generated": 1}
    reference_call = next(c for c in fake.calls if "[Assistant 2]" not in c["messages"][1]["content"])
    assert reference_call["messages"][0]["content"] == "You are a helpful assistant."


def test_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = ResponseCache(path)
    cache.put("k1", "m", "8 6", Usage(total_tokens=3))
    with open(path, "a") as fh:
        fh.write('{"key": "k2", "rep')
    reloaded = ResponseCache(path)
    assert len(reloaded) == 1 and reloaded.get("k1")["reply"] == "8 6"


def test_answers_generated_by_a_local_tinymed_model(fake, tmp_path):
    """A local (tiny) model answers items that have an image; an item without one is a counted failure."""
    from tinymed.evaluate.judge.answers import LocalModelConfig
    from tinymed.models import generate_answers, load_model

    save_tiny_model(tmp_path / "model", ["Question 0? Question 1? reference answer"] * 20, text_layers=1)
    write_questions(tmp_path / "q.jsonl", 2)
    Image.new("RGB", (4, 4), "blue").save(tmp_path / "fig0.png")  # fig1.png is absent
    local = LocalModelConfig(model=str(tmp_path / "model"), device="cpu", max_new_tokens=4)
    result = run_judge(judge_config(fake, tmp_path, answers=None, answer_model=local, image_root=str(tmp_path)))
    expected = generate_answers(load_model(tmp_path / "model", device="cpu"),
                                [Image.open(tmp_path / "fig0.png").convert("RGB")], ["Question 0?"], 4)[0].text
    reviews = {r.id: r for r in result.reviews}
    assert reviews["0"].answer == expected and reviews["0"].scores is not None
    assert reviews["1"].scores is None and result.summary.failures == 1
