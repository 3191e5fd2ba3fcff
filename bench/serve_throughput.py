"""Benchmark: `tinymed serve` under N concurrent clients, with request batching on and off.

The same model is served twice on loopback (a real uvicorn server each time): once with
`--max-batch` (batching on), once with max batch 1 (off). N clients each send K non-streaming chat
completions (temperature 0, a PNG image each) back to back. Prints requests/s, generated tokens/s,
p50/p95 latency for each, and the throughput ratio.

    .venv/bin/python bench/serve_throughput.py [--model NAME_OR_DIR] [--quant METHOD] [--clients 16]
        [--requests 4] [--max-tokens 16] [--min-tokens 0] [--max-batch 8] [--prompts describe] [--images DIR]
        [--cpu-linear aten,onednn] [--rounds 3]

Without --model it uses a tiny random-init LLaVA (the `tiny` preset). `--prompts describe` asks for
descriptions instead of short VQA questions; `--images DIR` sends that folder's JPEG/PNG files (in name
order, cycled) instead of generated colour squares. An edge folder (`tinymed export gguf`) is served
through llama.cpp, which answers one request at a time: its two modes differ only in queueing.
`--cpu-linear aten,onednn` measures both modes with each kernel for the fp32 CPU linear layers
(`tinymed serve --cpu-linear`; default auto, what the server uses). `--rounds 3` alternates the two modes
three times and reports each mode's median round.
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image
from rich.console import Console
from rich.table import Table

from tinymed.models import TinyConfig, build_tiny_model
from tinymed.serve.app import ServeConfig, create_app, load_served_model
from tinymed.serve.background import BackgroundServer
from tinymed.serve.batching import BatchConfig

PROMPTS = {
    "vqa": ["Is there a lesion in the left lung?", "What modality is this image?", "Is this an axial slice?",
            "Where is the abnormality?"],
    "describe": ["Describe this image.", "Describe the findings in this image.", "What does this image show?",
                 "Describe the abnormality in this image."],
}


def _model_dir(args) -> str:
    if args.model:
        return args.model
    texts = [q + " yes no ct mri x-ray axial left right lung" for q in PROMPTS["vqa"]] * 30
    model, processor = build_tiny_model(texts, TinyConfig())
    out = tempfile.mkdtemp(prefix="tinymed-bench-")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _image_urls(folder: str | None, n: int) -> list[str]:
    """`n` data URLs: the folder's JPEG/PNG files in name order (cycled), or generated colour squares."""
    if folder:
        files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if not files:
            raise SystemExit(f"no JPEG or PNG files in {folder}")
        return [f"data:image/{'png' if files[i % len(files)].suffix.lower() == '.png' else 'jpeg'};base64,"
                + base64.b64encode(files[i % len(files)].read_bytes()).decode() for i in range(n)]
    urls = []
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (224, 224), color=(20 * i % 255, 120, 255 - 15 * i % 255)).save(buf, format="PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _run_clients(url: str, args) -> dict:
    """N clients × K requests; returns wall seconds, latencies (s) and generated tokens."""
    questions = PROMPTS[args.prompts]
    urls = _image_urls(args.images, args.clients * args.requests)

    def client(c: int, http: httpx.Client) -> list[tuple[float, int]]:
        results = []
        for k in range(args.requests):
            body = {"model": "bench", "max_tokens": args.max_tokens, "min_tokens": args.min_tokens,
                    "temperature": 0, "messages": [{
                "role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[c * args.requests + k]}},
                                            {"type": "text", "text": questions[(c + k) % len(questions)]}]}]}
            t0 = time.perf_counter()
            reply = http.post(url + "/v1/chat/completions", json=body)
            reply.raise_for_status()
            results.append((time.perf_counter() - t0, reply.json()["usage"]["completion_tokens"]))
        return results

    # Clients are built before the clock starts: building an httpx.Client takes tens of ms (its SSL context),
    # which staggered the first requests by ~0.5 s and split the first batch (measured 2026-12-04).
    https = [httpx.Client(timeout=300) for _ in range(args.clients)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = [r for rs in pool.map(client, range(args.clients), https) for r in rs]
    for http in https:
        http.close()
    return {"seconds": time.perf_counter() - t0, "latencies": [r[0] for r in results],
            "tokens": sum(r[1] for r in results)}


def _measure(lm, args, max_batch: int) -> dict:
    config = ServeConfig(model_name="bench", batch=BatchConfig(max_batch=max_batch, max_queue=args.clients * 2))
    with BackgroundServer(create_app(lm, config)) as server:
        warm = argparse.Namespace(**{**vars(args), "clients": 2, "requests": 1})
        _run_clients(server.url, warm)
        return _run_clients(server.url, args)


def _median_run(runs: list[dict]) -> dict:
    """The run with the median wall time (the lower middle one of an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def _percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--quant")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=0,
                        help="vLLM's min_tokens: answers at least this long (= --max-tokens times a fixed length)")
    parser.add_argument("--prompts", choices=sorted(PROMPTS), default="vqa")
    parser.add_argument("--images", help="folder of JPEG/PNG images to send (default: generated squares)")
    parser.add_argument("--cpu-linear", default="auto", help="comma-separated kernels to measure: aten, onednn, auto")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the two modes alternately this many times; the table shows each mode's "
                             "median round (a VM whose speed drifts between modes biases one round's ratio)")
    args = parser.parse_args()

    model = _model_dir(args)
    console = Console()
    ratios = []
    modes = {f"batched (max {args.max_batch})": args.max_batch, "unbatched": 1}
    for kernel in args.cpu_linear.split(","):
        lm = load_served_model(model, device=args.device, quant=args.quant, linear_kernel=kernel)
        rounds = {mode: [] for mode in modes}
        for _ in range(args.rounds):
            for mode, max_batch in modes.items():
                rounds[mode].append(_measure(lm, args, max_batch))
        runs = {mode: _median_run(done) for mode, done in rounds.items()}
        _print_table(console, lm, args, runs)
        batched, unbatched = runs.values()
        each = [u["seconds"] / b["seconds"] for b, u in zip(*rounds.values())]
        ratios.append((lm.linear_kernel, unbatched["seconds"] / batched["seconds"], each))
        del lm
    for kernel, ratio, each in ratios:
        console.print(f"throughput ratio (batched / unbatched), linear kernel {kernel}: {ratio:.2f}× "
                      f"(medians; each round: {', '.join(f'{r:.2f}×' for r in each)})")


def _print_table(console: Console, lm, args, runs: dict) -> None:
    table = Table(title=f"tinymed serve: {args.clients} clients × {args.requests} requests, "
                        f"max_tokens {args.max_tokens} (min {args.min_tokens}), {args.prompts} prompts, {lm.device}, "
                        f"engine {lm.engine}, quant {lm.quant}, linear kernel {lm.linear_kernel}")
    for column in ("mode", "requests", "seconds", "requests/s", "tokens/s", "p50 latency s", "p95 latency s"):
        table.add_column(column, justify="right")
    for mode, run in runs.items():
        n = len(run["latencies"])
        table.add_row(mode, str(n), f"{run['seconds']:.2f}", f"{n / run['seconds']:.2f}",
                      f"{run['tokens'] / run['seconds']:.1f}", f"{_percentile(run['latencies'], 50):.3f}",
                      f"{_percentile(run['latencies'], 95):.3f}")
    console.print(table)


if __name__ == "__main__":
    main()
