"""Benchmark: every CPU quantization backend in the registry vs fp32, same model, same prompts, one run.

For each variant: does it load and generate, logits relative error vs fp32 (‖Δ‖/‖fp32‖ on two
prompts), static bytes (whole model, and its quantized layers vs the same layers in fp32), dynamic
memory as `tinymed profile` measures it on CPU (a fresh process: peak RSS while answering 4 questions
at batch 4, and the peak while loading, both above the process's RSS before loading), and batch-1
decode tokens/s as a ratio to fp32. Every backend is run at the default float32 compute dtype and, where
it has one (all but torch-int8), at bfloat16 ("… bf16"; unquantized bf16 is the reference for those).
Variants are timed in interleaved rounds and the medians taken, because absolute tokens/s drift between
runs on a shared VM; the ratio is the figure to quote.

    .venv/bin/python bench/quant_backends.py [--model DIR] [--rounds 3] [--new-tokens 24]

Without --model it builds a random-init LLaVA of about 100M parameters from configs (`tiny` preset
scaled up: 16 layers of hidden 768), large enough that decode is memory-bandwidth bound.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import traceback
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tinymed.evaluate.memory import ProfileConfig, cpu_peak_memory, measure_speed, question_set
from tinymed.models import TinyConfig, build_tiny_model, load_model, prepare_inputs
from tinymed.quantize import BACKENDS, QuantConfig, available_methods, fp32_linear_bytes, load_for_inference
from tinymed.quantize import module_bytes, modules_bytes, quantize_model, quantized_module_names

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 200
BENCH_MODEL = TinyConfig(text_hidden=768, text_layers=16, heads=8, vocab_size=2000, image_size=64)


def _model_dir(args) -> str:
    if args.model:
        return args.model
    model, processor = build_tiny_model(TEXTS, BENCH_MODEL)
    folder = tempfile.mkdtemp(prefix="tinymed-bench-quant-")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _variants(folder: str) -> dict[str, QuantConfig | str | None]:
    """Variant name → what load_for_inference applies to `folder` (None: fp32; 'bfloat16': a bf16 copy)."""
    variants: dict[str, QuantConfig | str | None] = {"fp32": None, "bf16": "bfloat16"}
    for method in available_methods("cpu"):
        variants[method] = QuantConfig(method=method)
        if method != "torch-int8":  # computes in float32 only
            variants[f"{method} bf16"] = QuantConfig(method=method, compute_dtype="bfloat16")
    return variants


def _saved(folder: str, work: str, name: str, quant: QuantConfig | str | None) -> str | None:
    """The folder that holds variant `name` (what the profile child process loads); None for plain bf16,
    which tinymed's loader (float32 on CPU) does not make from a folder, so it gets no dynamic figure."""
    if quant is None:
        return folder
    if quant == "bfloat16":
        return None
    return str(quantize_model(folder, quant, Path(work) / name.replace(" ", "-"), device="cpu").out_dir)


def _logits(lm, images, questions) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**prepare_inputs(lm, images[:2], questions[:2])).logits.float()


def _row(name: str, lm, reference: torch.Tensor | None, images, questions) -> dict:
    logits = _logits(lm, images, questions)
    row = {"variant": name, "works": "yes", "static_bytes": module_bytes(lm.model), "layer_ratio": None}
    row["rel_err"] = 0.0 if reference is None else float((logits - reference).norm() / reference.norm())
    if lm.quant in BACKENDS:
        names = quantized_module_names(lm.model, BACKENDS[lm.quant])
        row["layer_ratio"] = modules_bytes(lm.model, names) / fp32_linear_bytes(lm.model, names)
    return row


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    console = Console()
    folder = _model_dir(args)
    images, questions, _ = question_set(None, 4)
    loaded, rows, folders, reference = {}, {}, {}, None
    work = tempfile.mkdtemp(prefix="tinymed-bench-variants-")
    for name, quant in _variants(folder).items():
        try:
            folders[name] = _saved(folder, work, name, quant)
            lm = (
                load_model(folder, device="cpu", dtype=torch.bfloat16)
                if folders[name] is None else load_for_inference(folders[name], device="cpu")
            )
            rows[name] = _row(name, lm, reference, images, questions)
            reference = _logits(lm, images, questions) if name == "fp32" else reference
            loaded[name] = lm
        except Exception as exc:  # a broken backend is a result to show, not a reason to stop
            rows[name] = {"variant": name, "works": f"no: {type(exc).__name__}: {exc}"[:120]}
            traceback.print_exc()
    n_params = sum(p.numel() for p in loaded["fp32"].model.parameters())
    timing = ProfileConfig(model=folder, warmup=1, runs=3, max_new_tokens=args.new_tokens)
    speeds: dict[str, list[float]] = {name: [] for name in loaded}
    for round_ in range(args.rounds):
        for name, lm in loaded.items():
            speeds[name].append(measure_speed(lm, images, questions, 1, timing).decode_tokens_per_s)
            console.print(f"round {round_ + 1}/{args.rounds} {name}: {speeds[name][-1]:.1f} tok/s", highlight=False)
    for name in loaded:
        if folders[name] is not None:
            at_batch_4 = {"model": folders[name], "n_questions": 4, "batch_size": 4}
            dynamic = cpu_peak_memory(timing.model_copy(update=at_batch_4), "cpu")
            rows[name].update(dynamic_bytes=dynamic.peak_bytes, load_peak_bytes=dynamic.load_peak_bytes)
    fp32_speed = statistics.median(speeds["fp32"])
    what = args.model or "random LLaVA"
    table = Table(title=f"CPU backends, {what} ({n_params / 1e6:.0f}M params), batch 1, {torch.get_num_threads()} threads")
    columns = ("backend", "works?", "logits rel. err vs fp32", "static MiB", "quantized layers vs fp32",
               "dynamic MiB (answering)", "load peak MiB", "decode tok/s", "speed vs fp32")
    for col in columns:
        table.add_column(col)
    markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for name, row in rows.items():
        tps = statistics.median(speeds[name]) if name in speeds else None
        cells = [name, row["works"]] + ([
            f"{row['rel_err']:.3f}", f"{row['static_bytes'] / 2**20:.1f}",
            "-" if row["layer_ratio"] is None else f"{row['layer_ratio']:.1%}",
            _mib(row.get("dynamic_bytes")), _mib(row.get("load_peak_bytes")),
            f"{tps:.1f}", f"{tps / fp32_speed:.2f}×",
        ] if tps is not None else ["-"] * 7)
        table.add_row(*cells)
        markdown.append("| " + " | ".join(cells) + " |")
    console.print(table)
    print("\n".join(markdown))


if __name__ == "__main__":
    main()
