"""Which 4-bit CPU backend fits the demo: the two things it does with a variant, timed on its own model.

For a trained demo model (`tinymed demo`'s `finetune/final`) and each candidate (fp32 and the 8-bit choice
for reference): quantize it, evaluate the synthetic test split at batch 16 as the demo does (seconds, closed
accuracy, open recall), then batch-1 greedy decode speed as `tinymed profile` measures it (tokens/s).

    .venv/bin/python bench/demo_fq4.py --model tinymed-demo/finetune/final --data tinymed-demo/data
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tinymed.evaluate.memory import ProfileConfig, measure_speed, question_set
from tinymed.evaluate.runner import EvalConfig, evaluate
from tinymed.quantize import QuantConfig, available_methods, load_for_inference, quantize_model

CANDIDATES = {  # name → QuantConfig (None: the fp32 model itself)
    "fp32": None,
    "torch-int8": QuantConfig(method="torch-int8"),
    "bnb-nf4": QuantConfig(method="bnb-nf4"),
    "quanto-int4": QuantConfig(method="quanto-int4"),
    "quanto-int4 bf16": QuantConfig(method="quanto-int4", compute_dtype="bfloat16"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the demo's fine-tuned model folder")
    parser.add_argument("--data", required=True, help="the demo's synthetic dataset folder")
    parser.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N test questions")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tinymed-demo-fq4-"))
    images, questions, _ = question_set(None, 4)
    table = Table(title=f"demo variants on CPU, {torch.get_num_threads()} threads: evaluation at batch 16 "
                        f"(the test split{'' if args.eval_limit is None else f', first {args.eval_limit}'}) "
                        "and batch-1 decode")
    for column in ("variant", "eval s", "closed", "open recall", "batch-1 decode tok/s"):
        table.add_column(column, justify="right")
    cpu = set(available_methods("cpu"))
    for name, quant in CANDIDATES.items():
        if quant is not None and quant.method not in cpu:
            table.add_row(name, "not installed", "", "", "")
            continue
        folder = args.model if quant is None else str(quantize_model(args.model, quant, work / name.replace(" ", "-"), "cpu").out_dir)
        start = time.perf_counter()
        result = evaluate(EvalConfig(model=folder, dataset="synthetic", path=args.data, out_dir=work / name.replace(" ", "-") / "eval",
                                     batch_size=16, max_new_tokens=24, limit=args.eval_limit, device="cpu", resume=False))
        seconds = time.perf_counter() - start
        lm = load_for_inference(folder, device="cpu")
        speed = measure_speed(lm, images, questions, 1, ProfileConfig(model=folder, max_new_tokens=16))
        metrics = result.metrics["llava_med"]
        table.add_row(name, f"{seconds:.1f}", f"{metrics['closed_accuracy']:.1f}", f"{metrics['open_recall']:.1f}",
                      f"{speed.decode_tokens_per_s:.0f}")
        Console().print(f"{name}: eval {seconds:.1f} s, decode {speed.decode_tokens_per_s:.0f} tok/s", highlight=False)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
