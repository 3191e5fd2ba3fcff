"""The demo pipeline end to end on a small synthetic set: fine-tune → FP32 / 8-bit / 4-bit → evaluate → profile →
report, with every figure the report promises present for every variant."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_model

from tinymed.data import load_dataset
from tinymed.data.registry import DatasetSpec as EvalSpec
from tinymed.data.synthetic import SynthConfig, generate_synthetic
from tinymed.io import read_jsonl
from tinymed.pipeline import BenchmarkConfig, DemoConfig, run_benchmark, run_demo
from tinymed.quantize import default_demo_quant


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(out_dir=out, synth=SynthConfig(n_train=48, n_test=16, image_size=64), eval_batch_size=8,
                        max_new_tokens=6, device="cpu")  # fmt: skip
    return out, run_demo(config, say=lambda _: None)


@pytest.mark.slow
def test_demo_makes_full_precision_8_bit_and_4_bit_variants(demo):
    out, summary = demo
    expected = ["fp32", *(q.method for q in default_demo_quant("cpu"))]
    assert list(summary["variants"]) == expected and len(expected) == 3
    assert json.loads((out / "summary.json").read_text()) == summary
    for name in expected:
        variant = out / "variants" / name
        assert json.loads((variant / "eval" / "synthetic" / "metrics.json").read_text())["n"] == 16
        assert json.loads((variant / "profile.json").read_text())["dynamic"]["peak_bytes"] > 0
    assert summary["baseline"]["n"] == summary["model"]["n"] == 16


@pytest.mark.slow
def test_demo_report_has_every_figure_and_the_pareto_plot(demo):
    out, summary = demo
    report = out / "report"
    for name in ("report.md", "report.html", "pareto.png", "pareto.svg", "pareto.json"):
        assert (report / name).stat().st_size > 0, name
    pareto = json.loads((report / "pareto.json").read_text())
    assert (pareto["memory"], len(pareto["variants"])) == ("static", 3)
    for variant in pareto["variants"]:
        for key in ("static_bytes", "dynamic_bytes", "tokens_per_s", "accuracy"):
            assert variant[key] is not None and variant[key] >= 0, (variant["name"], key)
    assert summary["pareto_front"] == [v["name"] for v in pareto["variants"] if v["on_front"]] != []
    text = (report / "report.md").read_text()
    assert text.count("(met)") == 2 and "NOT met" not in text  # both quantized variants within their size targets
    assert "None: every variant has metrics and a profile." in text


def test_benchmark_on_a_carved_split_evaluates_its_val_part_and_baselines_on_the_rest(tmp_path):
    """PathVQA here has only a train split: `--split train:val30` benchmarks the val part, and the question-only
    baseline learns from train:rest30, whose images the val part never shows."""
    data = tmp_path / "data"
    generate_synthetic(data, SynthConfig(n_train=40, n_test=4, image_size=32))
    val = load_dataset("synthetic", data, "train:val30").samples
    model = save_tiny_model(tmp_path / "model", [s.question + " " + s.answer for s in val] * 4, text_layers=1)
    spec = EvalSpec(name="synthetic", path=str(data), split="train:val30")
    config = BenchmarkConfig(model=str(model), datasets=[spec], out_dir=tmp_path / "bench",
                             quant_methods=[default_demo_quant("cpu")[0].method],
                             max_new_tokens=4, profile=False, device="cpu")
    summary = run_benchmark(config, say=lambda _: None)
    ids = sorted(s.id for s in val)
    evaluated = read_jsonl(tmp_path / "bench" / "variants" / "fp32" / "eval" / "synthetic" / "predictions.jsonl")
    baseline = read_jsonl(tmp_path / "bench" / "baseline" / "synthetic" / "predictions.jsonl")
    assert sorted(r["id"] for r in evaluated) == sorted(r["id"] for r in baseline) == ids
    assert {r["split"] for r in evaluated + baseline} == {"train:val30"}
    assert summary["model"]["n"] == summary["baseline"]["n"] == len(ids) > 0
    assert summary["datasets"][0]["split"] == "train:val30"


def test_benchmark_rerun_reuses_quantized_variants_of_the_same_weights_and_remakes_them_for_new_ones(tmp_path):
    """A second `run_benchmark` finds each quantized folder made from the same weights the same way: it keeps it
    (so the evaluations resume instead of answering again); new source weights make it anew."""
    data = tmp_path / "data"
    generate_synthetic(data, SynthConfig(n_train=8, n_test=4, image_size=32))
    texts = [s.question + " " + s.answer for s in load_dataset("synthetic", data, "train").samples]
    model = save_tiny_model(tmp_path / "model", texts, text_layers=1)
    config = BenchmarkConfig(model=str(model), datasets=[EvalSpec(name="synthetic", path=str(data))],
                             out_dir=tmp_path / "bench", quant_methods=["torch-int8"], max_new_tokens=3,
                             profile=False, device="cpu")
    variant = tmp_path / "bench" / "variants" / "torch-int8"

    def stamps() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in [*(variant / "model").iterdir(),
                                                       variant / "eval" / "synthetic" / "predictions.jsonl"]}

    run_benchmark(config, say=lambda _: None)
    first = stamps()
    assert json.loads((variant / "variant.json").read_text())["made_from"]["quant"]["method"] == "torch-int8"
    run_benchmark(config, say=lambda _: None)
    assert stamps() == first

    save_tiny_model(model, texts[::-1], text_layers=1)  # other weights in the same folder
    run_benchmark(config, say=lambda _: None)
    remade = stamps()
    assert all(remade[name] != first[name] for name in first)
