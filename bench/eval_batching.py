"""Benchmark: batched greedy evaluation vs one question at a time (the reference scripts' way).

Same model, same questions, same machine, one run: answers must be identical; prints the wall time
of each and the speed-up ratio.

    .venv/bin/python bench/eval_batching.py [--model DIR] [--n 64] [--batch-size 16] [--max-new-tokens 16]

Without --model it uses a tiny random-init LLaVA (the `tiny` preset); questions and images come
from the embedded synthetic test set.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from rich.console import Console
from rich.table import Table

from tinymed.data.registry import load_dataset
from tinymed.models import TinyConfig, build_tiny_model, generate_answers, load_model


def _model_dir(args, samples) -> str:
    if args.model:
        return args.model
    texts = [s.question + " " + s.answer for s in samples]
    model, processor = build_tiny_model(texts, TinyConfig())
    folder = tempfile.mkdtemp(prefix="tinymed-bench-")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()

    samples = load_dataset("synthetic", None, split="test", limit=args.n).samples
    lm = load_model(_model_dir(args, samples), device="cpu")
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    generate_answers(lm, images[:2], questions[:2], args.max_new_tokens, batch_size=2)  # warm-up
    timings, answers = {}, {}
    for batch_size in (1, args.batch_size):
        start = time.perf_counter()
        answers[batch_size] = [a.text for a in generate_answers(lm, images, questions, args.max_new_tokens, batch_size)]
        timings[batch_size] = time.perf_counter() - start
    same = sum(a == b for a, b in zip(answers[1], answers[args.batch_size]))

    table = Table(title=f"Batched evaluation, {len(samples)} questions, max_new_tokens={args.max_new_tokens}, "
                        f"torch threads={torch.get_num_threads()}")
    for col in ("batch size", "seconds", "questions/s", "speed-up vs batch 1"):
        table.add_column(col, justify="right")
    for batch_size, seconds in timings.items():
        table.add_row(str(batch_size), f"{seconds:.2f}", f"{len(samples) / seconds:.1f}", f"{timings[1] / seconds:.2f}×")
    console = Console()
    console.print(table)
    console.print(f"identical greedy answers: {same}/{len(samples)}")


if __name__ == "__main__":
    main()
