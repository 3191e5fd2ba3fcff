"""The demo pipeline end to end on a small synthetic set: fine-tune → FP32 / 8-bit / 4-bit → evaluate → profile →
report, with every figure the report promises present for every variant."""

from __future__ import annotations

import json

import pytest

from tinymed.data.synthetic import SynthConfig
from tinymed.pipeline import DemoConfig, run_demo
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
