"""Where a llama.cpp decode step's time goes, per edge folder: llama.cpp's own eval time vs our Python loop,
with 1 and 2 threads, beside the bandwidth floor (GGUF bytes ÷ measured read bandwidth).

For each folder and thread count: prefill a fixed text prompt, then greedy-decode `--tokens` tokens through
`LlamaCppModel.answer_ids` (what evaluate/profile/serve run) with the end of answer held back. Wall time per
decode step is compared with the time spent inside `llama_decode` for the same steps: the difference is the
Python per-token work (logits view, argmax, batch set-up).

    .venv/bin/python bench/edge_decode_probe.py runs/edge-bench/edge-q4_0/model runs/edge-bench/edge-q8_0/model
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_engine import memory_bandwidth  # bench/ is the script's folder, first on sys.path
from tinymed.models.llamacpp import LlamaCppModel

PROMPT = "USER: Describe the findings of this chest radiograph in detail. ASSISTANT:"


def _probe(folder: Path, threads: int, tokens: int, repeats: int) -> dict:
    model = LlamaCppModel(folder, n_threads=threads)
    lib = model.lib
    raw = PROMPT.encode()
    buffer = (lib.llama_token * (len(raw) + 8))()
    prompt = list(buffer[: lib.llama_tokenize(model.vocab, raw, len(raw), buffer, len(buffer), True, False)])
    if model.kept is not None:
        prompt = [int(model.kept[row]) for row in prompt]
    stops = {int(lib.llama_vocab_eos(model.vocab))}
    inside = []  # seconds per llama_decode call
    decode = model._decode

    def timed(batch) -> None:
        start = time.perf_counter()
        decode(batch)
        inside.append(time.perf_counter() - start)

    model._decode = timed
    best_wall, best_eval = float("inf"), float("inf")
    for _ in range(repeats):
        inside.clear()
        start = time.perf_counter()
        new = model.answer_ids(prompt, None, max_new_tokens=tokens, stop_ids=stops, min_new_tokens=tokens)
        wall = time.perf_counter() - start - inside[0]  # without the prefill call
        steps = inside[1:]
        best_wall = min(best_wall, wall / len(steps))
        best_eval = min(best_eval, sum(steps) / len(steps))
        assert len(new) == tokens
    gguf_bytes = (folder / model.manifest["gguf"]).stat().st_size
    model.close()
    return {"wall_ms": best_wall * 1e3, "llama_ms": best_eval * 1e3, "gguf_bytes": gguf_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="edge folders (tinymed export gguf)")
    parser.add_argument("--threads", default="1,2", help="comma-separated llama.cpp thread counts")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per cell (the best is kept)")
    args = parser.parse_args()
    bandwidth = memory_bandwidth()
    table = Table(title=f"llama.cpp decode step, best of {args.repeats} × {args.tokens} tokens; "
                        f"read bandwidth {bandwidth / 1e9:.1f} GB/s (2 threads)")
    for column in ("folder", "threads", "ms/token (wall)", "in llama_decode ms", "Python ms", "floor ms", "wall/floor"):
        table.add_column(column, justify="right")
    for folder in args.folders:
        for threads in (int(t) for t in args.threads.split(",")):
            r = _probe(folder, threads, args.tokens, args.repeats)
            floor = r["gguf_bytes"] / bandwidth * 1e3
            table.add_row(str(folder), str(threads), f"{r['wall_ms']:.2f}", f"{r['llama_ms']:.2f}",
                          f"{r['wall_ms'] - r['llama_ms']:.2f}", f"{floor:.2f}", f"{r['wall_ms'] / floor:.2f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
