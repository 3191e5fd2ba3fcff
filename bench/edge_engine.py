"""transformers vs llama.cpp on one model, in one run: decode speed, time to first token, memory, accuracy.

Rows: transformers fp32 and its best 8-/4-bit CPU backends (quanto int8/int4, quantized once with
bfloat16 compute: the fastest accurate pair measured on CPU, see tinymed/quantize/registry.py), then the
model exported with `tinymed export gguf` at each llama.cpp quantization. Per row: decode tokens/s at
batch 1 and TTFT (image included) from `tinymed profile`, static and dynamic memory (static of an edge
folder = GGUF file + vision tensors), closed / open accuracy on VQA-RAD and SLAKE test (LLaVA-Med
metrics, `tinymed evaluate`), and for llama.cpp rows the bandwidth floor: GGUF bytes read per token
(`decode_read_bytes`: every tensor, but one row of an input embedding that has a head of its own) ÷
the memory bandwidth (2 threads summing a 1 GiB buffer) measured just before and just after that row's
speed runs (their mean: this VM's bandwidth moves 20-30% within a minute). The f16 row also reports how
often its answers equal transformers fp32's. Trimmed-vocabulary rows (`--trimmed q4_0:8000`: keep the
training data's tokens + the 8000 most frequent English tokens) add their vocabulary size and the shares
of test answers and prompts whose every token is kept (the rest is written / read re-spelled).
Untied-head rows (`--untied q4_0`) export with `untie_head` (the LM head as its own IQ4_NL tensor).
Everything lands in OUT (evaluations resume by run key).

    python bench/edge_engine.py --model tinymed-med-270m --data ../shared/data --out runs/edge-bench
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from tinymed.evaluate.memory import ProfileConfig, profile_model
from tinymed.evaluate.runner import EvalConfig, evaluate
from tinymed.io import read_jsonl, write_json_atomic
from tinymed.analysis import ReportConfig, build_report
from tinymed.data import load_dataset
from tinymed.models.features import answer_text
from tinymed.models.gguf import VocabularyTrim, decode_read_bytes, export_gguf
from tinymed.models.llamacpp import read_manifest
from tinymed.models.loading import load_processor
from tinymed.models.template import build_prompt
from tinymed.models.vocab import share_kept
from tinymed.models.zoo import resolve_model
from tinymed.quantize import QuantConfig, quantize_model
from tinymed.train.data import load_training_samples
from tinymed.train.recipes import zoo_recipe

DATASETS = ("vqa-rad", "slake")


def memory_bandwidth(gib: float = 1.0, threads: int = 2, repeats: int = 3) -> float:
    """Best read bandwidth in bytes/s: `threads` threads each summing their share of a `gib` GiB buffer."""
    buffer = np.ones(int(gib * (1 << 30)) // 8, dtype=np.float64)
    shares = np.array_split(buffer, threads)
    best = 0.0
    for _ in range(repeats):
        workers = [threading.Thread(target=np.sum, args=(share,)) for share in shares]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        best = max(best, buffer.nbytes / (time.perf_counter() - start))
    return best


def _evaluate(model: str, quant: str | None, data: Path, out: Path, limit: int | None) -> dict:
    scores = {}
    for dataset in DATASETS:
        result = evaluate(EvalConfig(model=model, quant=quant, dataset=dataset, path=str(data / dataset),
                                     out_dir=out / dataset, batch_size=16, max_new_tokens=16, limit=limit,
                                     device="cpu"))
        metrics = result.metrics["llava_med"]
        scores[dataset] = {"closed": metrics["closed_accuracy"], "open": metrics["open_recall"]}
    return scores


def _same_answers(a: Path, b: Path) -> float:
    """Share of questions answered with the same text in two evaluation folders (all datasets)."""
    same = total = 0
    for dataset in DATASETS:
        left = {r["id"]: r["prediction"] for r in read_jsonl(a / dataset / "predictions.jsonl")}
        right = {r["id"]: r["prediction"] for r in read_jsonl(b / dataset / "predictions.jsonl")}
        same += sum(left[k] == right.get(k) for k in left)
        total += len(left)
    return same / max(total, 1)


def _score(value: float | None) -> str:
    """A score for the table; None (no question of that kind, e.g. under --limit) as a dash."""
    return "—" if value is None else f"{value:.2f}"


def _training_samples(model: str, data: Path) -> list:
    return load_training_samples(zoo_recipe(model, data, out_dir="."))[0]


def _vocabulary_report(folder: Path, data: Path) -> dict:
    """A trimmed row's vocabulary size and the shares of VQA-RAD + SLAKE test answers (" answer") and
    prompts (template + question) whose every token is kept: what it writes or reads only re-spelled."""
    kept = json.loads((folder / "vocabulary.json").read_text())["kept"]
    processor = load_processor(folder)
    tokenizer = processor.tokenizer
    samples = [s for dataset in DATASETS for s in load_dataset(dataset, data / dataset, "test").samples]
    answers = tokenizer([answer_text(s.answer) for s in samples], add_special_tokens=False)["input_ids"]
    prompts = tokenizer([build_prompt(processor, s.question) for s in samples])["input_ids"]
    return {"n_vocab": len(kept), "test_answers_kept": share_kept(kept, answers),
            "test_prompts_kept": share_kept(kept, prompts)}


def _row(name: str, model: str, quant: str | None, args, out: Path) -> dict:
    before = memory_bandwidth()
    profile = profile_model(ProfileConfig(model=model, quant=quant, device="cpu", batch_size=8, max_new_tokens=16,
                                          runs=3, out_dir=out))
    bandwidth = (before + memory_bandwidth()) / 2
    write_json_atomic(out / "variant.json", {"name": name, "quant": profile.quant, "model": model})
    return {
        "variant": name, "model": model,
        "decode_tokens_per_s": profile.speed["batch_1"].decode_tokens_per_s,
        "bandwidth_bytes_per_s": bandwidth,
        "ttft_ms": profile.speed["batch_1"].ttft_ms,
        "static_bytes": profile.static.bytes,
        "dynamic_peak_bytes": profile.dynamic.peak_bytes if profile.dynamic else None,
        "accuracy": _evaluate(model, quant, args.data, out / "eval", args.limit),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tinymed-med-270m")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--out", type=Path, default=Path("runs/edge-bench"))
    parser.add_argument("--hf", default="none,quanto-int8,quanto-int4", help="transformers rows (none = fp32)")
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m,q4_0", help="llama.cpp rows")
    parser.add_argument("--trimmed", default="q4_0:0,q4_0:8000,q4_0:32000",
                        help="trimmed-vocabulary llama.cpp rows, QUANT:TOP_N (zoo models: trained on their recipe)")
    parser.add_argument("--untied", default="q4_0", help="llama.cpp rows exported with an untied IQ4_NL LM head")
    parser.add_argument("--limit", type=int, default=None, help="questions per dataset (quick look)")
    args = parser.parse_args()
    rows = []
    for quant in args.hf.split(","):
        if quant == "none":
            rows.append(_row("transformers fp32", args.model, None, args, args.out / "hf-none"))
            continue
        folder = args.out / f"hf-{quant}" / "model"  # quantized once, computing in bfloat16 (fastest on CPU)
        if not (folder / "config.json").is_file():
            quantize_model(resolve_model(args.model), QuantConfig(method=quant, compute_dtype="bfloat16"), folder,
                           device="cpu")
        rows.append(_row(f"transformers {quant} (bf16)", str(folder), None, args, args.out / f"hf-{quant}"))
    edge = [(quant, None, False) for quant in args.quants.split(",")]
    edge += [(quant, None, True) for quant in args.untied.split(",") if quant]
    edge += [(spec.split(":")[0], int(spec.split(":")[1]), False) for spec in args.trimmed.split(",") if spec]
    for quant, top_n, untie in edge:
        tag = quant + ("-untied-head" if untie else "") + ("" if top_n is None else f"-vocab{top_n}")
        folder = args.out / f"edge-{tag}" / "model"
        if not (folder / "tinymed_edge.json").is_file():
            trim = None if top_n is None else VocabularyTrim(_training_samples(args.model, args.data), top_n)
            export_gguf(args.model, quant, folder, trim=trim, untie_head=untie)
        row = _row(f"llama.cpp {tag}", str(folder), None, args, args.out / f"edge-{tag}")
        row["floor_tokens_per_s"] = row["bandwidth_bytes_per_s"] / decode_read_bytes(folder / read_manifest(folder)["gguf"])
        if quant == "f16" and top_n is None and "none" in args.hf.split(","):
            row["same_answers_as_fp32"] = _same_answers(args.out / "hf-none" / "eval", args.out / f"edge-{tag}" / "eval")
        if top_n is not None:
            row.update(_vocabulary_report(folder, args.data))
        rows.append(row)
    fp32 = rows[0]["decode_tokens_per_s"]
    write_json_atomic(args.out / "edge_bench.json", {"rows": rows})
    table = Table(title=f"edge engine bench: {args.model}; floor = read bandwidth around the row's speed runs "
                        "(2 threads) ÷ GGUF bytes a decode step reads")
    for col in ("variant", "decode tok/s", "vs first", "GB/s", "floor tok/s", "decode/floor", "TTFT ms",
                "static MiB", "dynamic MiB",
                "VQA-RAD open/closed", "SLAKE open/closed", "same as fp32", "vocab", "answers / prompts kept"):
        table.add_column(col, justify="right")
    for r in rows:
        acc = r["accuracy"]
        table.add_row(
            r["variant"], f"{r['decode_tokens_per_s']:.1f}", f"{r['decode_tokens_per_s'] / fp32:.2f}×",
            f"{r['bandwidth_bytes_per_s'] / 1e9:.1f}",
            f"{r['floor_tokens_per_s']:.1f}" if "floor_tokens_per_s" in r else "",
            f"{r['decode_tokens_per_s'] / r['floor_tokens_per_s']:.2f}" if "floor_tokens_per_s" in r else "",
            f"{r['ttft_ms']:.0f}", f"{r['static_bytes'] / 2**20:.1f}",
            f"{r['dynamic_peak_bytes'] / 2**20:.0f}" if r["dynamic_peak_bytes"] else "",
            *(f"{_score(acc[d]['open'])} / {_score(acc[d]['closed'])}" for d in DATASETS),
            f"{r['same_answers_as_fp32']:.1%}" if "same_answers_as_fp32" in r else "",
            str(r.get("n_vocab", "")),
            f"{r['test_answers_kept']:.1%} / {r['test_prompts_kept']:.1%}" if "n_vocab" in r else "",
        )
    Console().print(table)
    report = build_report(ReportConfig(run_dirs=[args.out], out_dir=args.out / "report"))
    print(f"Pareto front (static memory vs mean closed accuracy): {', '.join(report.front)}")


if __name__ == "__main__":
    main()
