"""Soak benchmark: does `tinymed serve` give memory back after rounds of mixed, partly hostile traffic?

Starts `tinymed serve` (the real CLI, in its own process) on loopback, warms it up with one round, then
sends ROUNDS rounds of 64 requests from 16 client threads: answered ones (PNG, JPEG, DICOM, large
4096×4096 images, streaming or not), invalid ones (pixel-bomb header, malformed DICOM, bad base64,
text/plain body, oversized stop strings, wrong types) and abandoned ones (the client leaves mid-stream or
while queued). After each round, once the server is idle, it reads the server's resident memory (RSS) and
peak (VmHWM). Prints a table; exits 1 when a round ends more than --budget-mib above the post-warm-up
baseline, or when any request got a 500.

    .venv/bin/python bench/serve_soak.py [--model DIR] [--rounds 5] [--budget-mib 150] [--env NAME=VALUE ...]

`--env` sets environment variables of the server process (e.g. MALLOC_ARENA_MAX=8 to compare allocator
settings). Without --model it uses a tiny random-init LLaVA (the `tiny` preset).
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
from PIL import Image
from rich.console import Console
from rich.table import Table

from tinymed.models import TinyConfig, build_tiny_model

REQUESTS_PER_ROUND, CLIENTS = 64, 16
QUESTION = "Is there a lesion in the left lung?"


def _model_dir() -> str:
    model, processor = build_tiny_model([QUESTION + " yes no ct mri x-ray axial left right lung"] * 60, TinyConfig())
    out = tempfile.mkdtemp(prefix="tinymed-soak-")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(side: int) -> bytes:
    """A small PNG of one colour that decodes to side × side pixels."""
    return _encoded(Image.new("L", (side, side)), "PNG")


def _dicom(**elements) -> bytes:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    for key, value in elements.items():
        setattr(ds, key, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _images() -> dict[str, str]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    large = Image.fromarray(np.tile(np.arange(4096, dtype=np.uint16)[None, :] // 16, (4096, 1)).astype(np.uint8))
    return {
        "png": _url(_encoded(noise, "PNG"), "image/png"),
        "jpeg": _url(_encoded(noise, "JPEG"), "image/jpeg"),
        "large": _url(_encoded(large, "PNG"), "image/png"),
        "large16": _url(_encoded(Image.fromarray(np.asarray(large, dtype=np.uint16) * 257), "PNG"), "image/png"),
        "dicom": _url(_dicom(), "application/dicom"),
        "bomb": _url(_bomb_png(6300), "image/png"),
        "bad-dicom": _url(_dicom(WindowWidth=0), "application/dicom"),
        "truncated": _url(_encoded(noise, "JPEG")[:2000], "image/jpeg"),
    }


def _body(image: str | None = None, **fields) -> dict:
    content = [{"type": "text", "text": QUESTION}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": "soak", "max_tokens": 12, "messages": [{"role": "user", "content": content}]} | fields


def _plan(images: dict[str, str]) -> list[tuple[str, dict | bytes]]:
    """One round: (kind, body) × 64 — kinds: answer, stream, invalid, text-plain, leave-stream, leave-queued."""
    answered = [("answer", _body(images[k])) for k in ("png", "jpeg", "large", "large16", "dicom")] + [
        ("stream", _body(images[k], stream=True)) for k in ("png", "large", "dicom")]
    invalid = [("invalid", _body(images[k])) for k in ("bomb", "bad-dicom", "truncated")] + [
        ("invalid", _body("data:image/png;base64,@@@")),
        ("invalid", _body(images["png"], stop=["x" * 100_000] * 4)),
        ("invalid", _body(images["png"], max_tokens=True)),
        ("invalid", _body(images["png"], model="other")),
        ("text-plain", b'{"model": "soak"}'),
    ]
    abandoned = [("leave-stream", _body(images["large"], stream=True, max_tokens=200, stop=["\u2603"])),
                 ("leave-queued", _body(images["large"], max_tokens=200, stop=["\u2603"]))]
    cycle = answered + invalid + abandoned * 3
    return [cycle[i % len(cycle)] for i in range(REQUESTS_PER_ROUND)]


def _send(http: httpx.Client, url: str, kind: str, body) -> int:
    """One request; returns the status the client saw (499: the client left on purpose)."""
    if kind == "text-plain":
        return http.post(url, content=body, headers={"content-type": "text/plain"}).status_code
    if kind == "leave-queued":
        try:
            return http.post(url, json=body, timeout=0.3).status_code
        except httpx.TimeoutException:
            return 499
    if kind in ("stream", "leave-stream"):
        with http.stream("POST", url, json=body) as r:
            if kind == "leave-stream" and r.status_code == 200:
                next(r.iter_lines())
                return 499
            r.read()
            return r.status_code
    return http.post(url, json=body).status_code


def _round(url: str, plan) -> tuple[Counter, float]:
    t0 = time.perf_counter()

    def client(c: int) -> list[int]:
        with httpx.Client(timeout=120) as http:
            return [_send(http, url + "/v1/chat/completions", *plan[i]) for i in range(c, len(plan), CLIENTS)]

    with ThreadPoolExecutor(CLIENTS) as pool:
        statuses = Counter(s for ss in pool.map(client, range(CLIENTS)) for s in ss)
    return statuses, time.perf_counter() - t0


def _wait_idle(url: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queue = httpx.get(url + "/health").json()["queue"]
        if queue["waiting"] == 0 and queue["running"] == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("the server did not become idle")


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--budget-mib", type=float, default=150)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server process")
    args = parser.parse_args()

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | dict(e.split("=", 1) for e in args.env)
    command = [sys.executable, "-m", "tinymed.cli", "serve", "--model", args.model or _model_dir(), "--model-name",
               "soak", "--port", str(port), "--max-batch", "4", "--max-queue", "32", "--timeout", "60"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/health").raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start: {server.stderr.read()[-2000:]}") from None
                time.sleep(0.5)
        process = psutil.Process(server.pid)
        plan = _plan(_images())
        _round(url, plan)  # warm-up
        _wait_idle(url)
        baseline = process.memory_info().rss
        table = Table(title=f"tinymed serve soak: {args.rounds} rounds × {REQUESTS_PER_ROUND} mixed requests, "
                            f"{CLIENTS} clients; RSS baseline after warm-up {baseline / 2**20:.0f} MiB"
                            + (f"; server env {' '.join(args.env)}" if args.env else ""))
        for column in ("round", "seconds", "statuses", "RSS MiB", "Δ baseline MiB", "peak RSS MiB"):
            table.add_column(column, justify="right")
        worst, errors = 0.0, 0
        for r in range(1, args.rounds + 1):
            statuses, seconds = _round(url, plan)
            _wait_idle(url)
            rss = process.memory_info().rss
            worst, errors = max(worst, (rss - baseline) / 2**20), errors + statuses[500]
            table.add_row(str(r), f"{seconds:.1f}", " ".join(f"{s}×{n}" for s, n in sorted(statuses.items())),
                          f"{rss / 2**20:.0f}", f"{(rss - baseline) / 2**20:+.0f}", f"{_peak_rss(server.pid) / 2**20:.0f}")
    finally:
        server.terminate()
        server.wait(30)
    console = Console()
    console.print(table)
    verdict = worst <= args.budget_mib and errors == 0
    console.print(f"largest growth over the baseline {worst:+.0f} MiB (budget {args.budget_mib:.0f}); "
                  f"500s: {errors}; {'PASS' if verdict else 'FAIL'}")
    sys.exit(0 if verdict else 1)


if __name__ == "__main__":
    main()
