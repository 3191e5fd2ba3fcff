"""A short, bounded load test on loopback: 16 clients for ~8 s against a small queue. Only 503 shedding
is allowed as an error, every accepted request is answered, and memory comes back near its start."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from PIL import Image

from conftest import save_tiny_model
from tinymed.models import load_model
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer
from tinymed.serve.batching import BatchConfig

CLIENTS, SECONDS = 16, 8.0


def _body(i: int) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (128, 128), color=(i * 37 % 255, 80, 160)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"model": "tiny", "max_tokens": 12, "stream": i % 2 == 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"Is there a lesion? ({i})"}]}]}


def _client(url: str, c: int, until: float) -> list[tuple[int, bool]]:
    """(status, answered) per request until the deadline; streaming requests count as answered at [DONE]."""
    results = []
    with httpx.Client(timeout=60) as http:
        i = 0
        while time.monotonic() < until:
            body = _body(c * 1000 + i)
            with http.stream("POST", url + "/v1/chat/completions", json=body) as r:
                text = r.read().decode()
            if r.status_code == 200:
                answered = text.rstrip().endswith("data: [DONE]") if body["stream"] else "choices" in text
            else:
                answered = False
                time.sleep(float(r.headers.get("retry-after", "0.1")) / 10)
            results.append((r.status_code, answered))
            i += 1
    return results


@pytest.mark.slow
def test_sixteen_clients_only_shed_with_503_and_memory_returns(tmp_path):
    lm = load_model(save_tiny_model(tmp_path, ["is there a lesion? yes no ct mri"] * 40, text_layers=2), device="cpu")
    config = ServeConfig(model_name="tiny", batch=BatchConfig(max_batch=4, max_queue=4), retry_after_s=1)
    process = psutil.Process()
    with BackgroundServer(create_app(lm, config)) as server:
        _client(server.url, 0, time.monotonic() + 1.0)  # warm up
        rss_before = process.memory_info().rss
        until = time.monotonic() + SECONDS
        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for rs in pool.map(lambda c: _client(server.url, c, until), range(CLIENTS)) for r in rs]
        health = httpx.get(server.url + "/health").json()
        rss_after = process.memory_info().rss
    statuses = {s for s, _ in results}
    assert statuses <= {200, 503}, statuses
    assert all(answered for s, answered in results if s == 200)
    assert sum(s == 200 for s, _ in results) >= CLIENTS
    assert any(s == 503 for s, _ in results), "a 4-deep queue under 16 clients should shed some load"
    assert health["queue"]["waiting"] == 0 and health["queue"]["running"] == 0
    assert rss_after - rss_before < 150 * 2**20, f"memory grew by {(rss_after - rss_before) / 2**20:.0f} MiB"
