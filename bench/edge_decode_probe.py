"""Where a llama.cpp decode step's time goes, per edge folder: llama.cpp's own eval time vs our Python loop,
with 1 and 2 threads, beside the bandwidth floor (the GGUF bytes a decode step reads, `decode_read_bytes`, ÷
read bandwidth measured just before and just after each round: this VM's bandwidth moves 20-30% within a
minute, so a floor from a figure taken minutes apart can land on either side of the truth).

For each folder and thread count: prefill a fixed text prompt, then greedy-decode `--tokens` tokens through
`LlamaCppModel.answer_ids` (what evaluate/profile/serve run) with the end of answer held back. Wall time per
decode step is compared with the time spent inside `llama_decode` for the same steps: the difference is the
Python per-token work (logits view, argmax, batch set-up).

    .venv/bin/python bench/edge_decode_probe.py runs/edge-bench/edge-q4_0/model runs/edge-bench/edge-q8_0/model
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from edge_engine import memory_bandwidth  # bench/ is the script's folder, first on sys.path
from tinymed.models.gguf import decode_read_bytes
from tinymed.models.llamacpp import LlamaCppModel

PROMPT = "USER: Describe the findings of this chest radiograph in detail. ASSISTANT:"


def _probe(folder: Path, threads: int, tokens: int, repeats: int) -> dict:
    """Medians over `repeats` rounds of: read bandwidth, `tokens` greedy decode steps, read bandwidth again.

    Each round's floor uses the mean of the two bandwidth figures taken around it, so the floor and the
    decode time share the VM's state of that moment (its bandwidth moves 20-30% within a minute here)."""
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
    gguf_bytes = decode_read_bytes(folder / model.manifest["gguf"])
    model.answer_ids(prompt, None, max_new_tokens=tokens, stop_ids=stops, min_new_tokens=tokens)  # warm-up
    rounds = []
    for _ in range(repeats):
        before = memory_bandwidth()
        inside.clear()
        start = time.perf_counter()
        new = model.answer_ids(prompt, None, max_new_tokens=tokens, stop_ids=stops, min_new_tokens=tokens)
        wall = (time.perf_counter() - start - inside[0]) / (len(inside) - 1)  # per step, without the prefill
        bandwidth = (before + memory_bandwidth()) / 2
        assert len(new) == tokens
        rounds.append({"wall_ms": wall * 1e3, "llama_ms": statistics.fmean(inside[1:]) * 1e3,
                       "bandwidth": bandwidth, "floor_ms": gguf_bytes / bandwidth * 1e3})
    model.close()
    result = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    result["wall_per_floor"] = statistics.median(r["wall_ms"] / r["floor_ms"] for r in rounds)
    result["wall_per_floor_range"] = (min(r["wall_ms"] / r["floor_ms"] for r in rounds),
                                      max(r["wall_ms"] / r["floor_ms"] for r in rounds))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path, help="edge folders (tinymed export gguf)")
    parser.add_argument("--threads", default="1,2", help="comma-separated llama.cpp thread counts")
    parser.add_argument("--tokens", type=int, default=32, help="tokens decoded per measurement")
    parser.add_argument("--repeats", type=int, default=7, help="rounds per cell (medians are shown)")
    args = parser.parse_args()
    table = Table(title=f"llama.cpp decode step: medians of {args.repeats} rounds of {args.tokens} tokens, each "
                        "between two read-bandwidth measurements (2 threads, 1 GiB)")
    for column in ("folder", "threads", "ms/token (wall)", "in llama_decode ms", "Python ms", "GB/s", "floor ms",
                   "wall/floor (range)"):
        table.add_column(column, justify="right")
    for folder in args.folders:
        for threads in (int(t) for t in args.threads.split(",")):
            r = _probe(folder, threads, args.tokens, args.repeats)
            low, high = r["wall_per_floor_range"]
            table.add_row(str(folder), str(threads), f"{r['wall_ms']:.2f}", f"{r['llama_ms']:.2f}",
                          f"{r['wall_ms'] - r['llama_ms']:.2f}", f"{r['bandwidth'] / 1e9:.1f}", f"{r['floor_ms']:.2f}",
                          f"{r['wall_per_floor']:.2f} ({low:.2f}-{high:.2f})")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
