"""tinymed report: Pareto front, collection from run folders, report files, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from pydantic import ValidationError
from typer.testing import CliRunner

from tinymed.analysis import ReportConfig, ReportError, build_report, collect_variants, dominates, pareto_front
from tinymed.cli.report import register

MIB = 2**20


def write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj, encoding="utf-8")


def metrics(closed: float, open_recall: float = 40.0) -> dict:
    return {"n": 20, "n_open": 10, "n_closed": 10, "errors": 0,
            "llava_med": {"open_recall": open_recall, "open_precision": 30.0, "open_f1": 33.0,
                          "open_exact_match": 10.0, "open_bleu1": 20.0, "open_bleu2": 10.0, "open_bleu3": 5.0,
                          "closed_accuracy": closed},
            "strict": {"open_exact_match": 5.0, "open_token_f1": 25.0, "closed_exact_match": closed - 10,
                       "closed_yes_no_accuracy": closed},
            "by": {"answer_type": {"OPEN": {"n": 10}}}}  # fmt: skip


def profile(static_mib: float, dynamic_mib: float, tokens_per_s: float = 50.0) -> dict:
    return {"static": {"bytes": static_mib * MIB, "disk_bytes": static_mib * MIB, "method": "parameter bytes"},
            "dynamic": {"peak_bytes": dynamic_mib * MIB, "method": "peak RSS"},
            "speed": {"batch_1": {"ttft_ms": 20.0, "decode_tokens_per_s": tokens_per_s, "latency_ms": 400.0}},
            "model": "m", "quant": None, "device": "cpu"}  # fmt: skip


def judge_summary(overall: float) -> dict:
    groups = {g: {"n": 5, "reference_mean": 8.0, "model_mean": 4.0, "relative_score": overall, "ratio_of_means": 50.0}
              for g in ("overall", "conversation", "detailed_description", "chest_xray", "mri", "histology",
                        "gross", "ct_scan")}  # fmt: skip
    return {"groups": groups, "failures": 0, "requests": 40, "cached": 0, "judge_model": "judge-x"}


def make_variant(root: Path, name: str, quant: str | None, closed: dict[str, float], prof: dict | None,
                 judge: dict | None = None) -> Path:
    folder = root / name
    write(folder / "variant.json", {"name": name, "quant": quant, "model_dir": str(folder / "model")})
    if prof is not None:
        write(folder / "profile.json", prof)
    for dataset, accuracy in closed.items():
        write(folder / "eval" / dataset / "metrics.json", metrics(accuracy))
        write(folder / "eval" / dataset / "eval_config.json",
              {"model": "m", "quant": quant, "dataset": dataset, "path": None, "split": "test"})
    if judge is not None:
        write(folder / "judge" / "judge_summary.json", judge)
    return folder


@pytest.fixture
def variants_root(tmp_path: Path) -> Path:
    """fp16 (big, best), fq8 (smaller, nearly as good; judged), fq4 (smallest static, worst; huge dynamic peak),
    fq4-copy (identical figures to fq4), noprof (metrics but no profile)."""
    root = tmp_path / "variants"
    make_variant(root, "fp16", None, {"vqa-rad": 80.0, "slake": 70.0}, profile(400, 600))
    make_variant(root, "fq8", "int8", {"vqa-rad": 78.0, "slake": 70.0}, profile(200, 300), judge_summary(61.5))
    make_variant(root, "fq4", "int4", {"vqa-rad": 60.0, "slake": 50.0}, profile(120, 900))
    make_variant(root, "fq4-copy", "int4", {"vqa-rad": 60.0, "slake": 50.0}, profile(120, 900))
    make_variant(root, "noprof", "int4", {"vqa-rad": 99.0, "slake": 99.0}, None)
    return root


# --- Pareto front ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("points", "expected"), [
    ([], []),
    ([(100.0, 50.0)], [True]),
    ([(1, 10), (2, 20), (3, 30)], [True, True, True]),                # all on front (trade-off)
    ([(1, 10), (2, 5)], [True, False]),                               # more memory, less accuracy
    ([(1, 10), (1, 9)], [True, False]),                               # equal memory, less accuracy
    ([(1, 10), (2, 10)], [True, False]),                              # equal accuracy, more memory
    ([(1, 10), (1, 10), (2, 5)], [True, True, False]),                # equal points share the front
    ([(1, 10), (3, 5), (3, 5)], [True, False, False]),                # dominated duplicates both off
    ([(None, 99), (1, None), (5, 1)], [False, False, True]),          # a missing figure: off, dominates nothing
])  # fmt: skip
def test_pareto_front_on_hand_made_points(points, expected):
    assert pareto_front(points) == expected


def test_dominates_needs_one_strict_improvement():
    assert dominates((1, 10), (2, 10))
    assert dominates((1, 10), (1, 9))
    assert not dominates((1, 10), (1, 10))
    assert not dominates((1, 10), (0.5, 5))
    assert not dominates((None, 100), (5, 1))


# --- Collection ---------------------------------------------------------------------------------------------


def test_collect_parent_folder_reads_every_variant(variants_root):
    variants = {v.name: v for v in collect_variants([variants_root])}
    assert sorted(variants) == ["fp16", "fq4", "fq4-copy", "fq8", "noprof"]
    fq8 = variants["fq8"]
    assert fq8.quant == "int8"
    assert sorted(fq8.metrics) == ["slake", "vqa-rad"]
    assert fq8.static_bytes == 200 * MIB and fq8.dynamic_bytes == 300 * MIB
    assert fq8.speed("decode_tokens_per_s") == 50.0
    assert fq8.mean_metric("llava_med.closed_accuracy") == pytest.approx(74.0)
    assert fq8.judge_score("overall") == 61.5
    assert fq8.gaps == []
    assert variants["noprof"].gaps == ["no profile (profile.json) found"]


def test_collect_single_variant_folder(variants_root):
    [variant] = collect_variants([variants_root / "fq4"])
    assert (variant.name, variant.quant) == ("fq4", "int4")
    assert variant.metric("slake", "llava_med.closed_accuracy") == 50.0


def test_collect_plain_evaluate_folders_merge_by_model_and_quant(tmp_path):
    write(tmp_path / "rad" / "metrics.json", metrics(70.0))
    write(tmp_path / "rad" / "eval_config.json", {"model": "runs/a/final", "quant": "int8", "dataset": "vqa-rad"})
    write(tmp_path / "slk" / "metrics.json", metrics(60.0))
    write(tmp_path / "slk" / "eval_config.json", {"model": "runs/a/final", "quant": "int8", "dataset": "slake"})
    write(tmp_path / "prof" / "profile.json", {**profile(50, 80), "model": "runs/a/final", "quant": "int8"})
    [variant] = collect_variants([tmp_path / "rad", tmp_path / "slk", tmp_path / "prof"])
    assert (variant.name, variant.quant) == ("runs/a/final", "int8")
    assert sorted(variant.metrics) == ["slake", "vqa-rad"]
    assert variant.mean_metric("llava_med.closed_accuracy") == 65.0
    assert variant.static_bytes == 50 * MIB
    assert variant.gaps == []


def test_collect_plain_folder_without_config_falls_back_to_folder_name(tmp_path):
    write(tmp_path / "synthetic" / "metrics.json", metrics(55.0))
    [variant] = collect_variants([tmp_path / "synthetic"])
    assert variant.name == "synthetic" and list(variant.metrics) == ["synthetic"]
    assert variant.gaps == ["no profile (profile.json) found"]


def test_collect_reports_unreadable_files_as_gaps(tmp_path):
    folder = make_variant(tmp_path, "v", None, {"slake": 50.0}, None)
    write(folder / "profile.json", "{not json")
    write(folder / "eval" / "vqa-rad" / "predictions.jsonl", "")  # evaluation that never finished
    [variant] = collect_variants([folder])
    assert any(str(folder / "profile.json") in gap and "malformed JSON (line 1" in gap for gap in variant.gaps)
    assert any(str(folder / "eval" / "vqa-rad") in gap and "no usable metrics.json" in gap for gap in variant.gaps)
    assert list(variant.metrics) == ["slake"]


def test_collect_rejects_missing_and_empty_folders(tmp_path):
    with pytest.raises(ReportError, match="run folder not found"):
        collect_variants([tmp_path / "absent"])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ReportError, match="neither a variant folder"):
        collect_variants([tmp_path / "empty"])


# --- Report -------------------------------------------------------------------------------------------------


@pytest.fixture
def built(variants_root, tmp_path):
    return build_report(ReportConfig(run_dirs=[variants_root], out_dir=tmp_path / "report"))


def test_report_writes_every_file(built):
    names = {path.name for path in built.files}
    expected = {"report.md", "report.html", "pareto.json", "pareto.png", "pareto.svg",
                "pareto_vqa-rad.png", "pareto_vqa-rad.svg", "pareto_slake.png", "pareto_slake.svg"}  # fmt: skip
    assert names == expected
    for name in expected:
        assert (built.out_dir / name).stat().st_size > 0
    assert (built.out_dir / "pareto.png").read_bytes().startswith(b"\x89PNG")
    assert b"<svg" in (built.out_dir / "pareto.svg").read_bytes()


def test_pareto_json_schema_and_front(built):
    data = json.loads((built.out_dir / "pareto.json").read_text())
    assert (data["memory"], data["accuracy"]) == ("static", "llava_med.closed_accuracy")
    by_name = {v["name"]: v for v in data["variants"]}
    keys = {"name", "quant", "static_bytes", "dynamic_bytes", "tokens_per_s", "accuracy", "metrics", "on_front"}
    assert all(keys <= set(v) for v in data["variants"])
    # static: fp16 (400 MiB, 75) > fq8 (200, 74) > fq4 = fq4-copy (120, 55): a trade-off, all on the front.
    assert {n: v["on_front"] for n, v in by_name.items()} == {
        "fp16": True, "fq8": True, "fq4": True, "fq4-copy": True, "noprof": False}
    assert built.front == ["fp16", "fq4", "fq4-copy", "fq8"]  # collection order: sorted folder names
    assert by_name["fq8"]["accuracy"] == pytest.approx(74.0)
    assert by_name["fq8"]["static_bytes"] == 200 * MIB
    assert by_name["fq8"]["metrics"]["vqa-rad"]["llava_med"]["closed_accuracy"] == 78.0
    assert "by" not in by_name["fq8"]["metrics"]["vqa-rad"]
    assert by_name["noprof"]["static_bytes"] is None
    assert "no profile (profile.json) found" in by_name["noprof"]["gaps"]


def test_dynamic_memory_and_another_metric_change_the_front(variants_root, tmp_path):
    result = build_report(ReportConfig(run_dirs=[variants_root], out_dir=tmp_path / "r", memory="dynamic",
                                       accuracy="strict.closed_exact_match"))
    # dynamic: fq4's 900 MiB peak is above fq8's 300 with lower accuracy → dominated.
    assert result.front == ["fp16", "fq8"]
    data = json.loads((result.out_dir / "pareto.json").read_text())
    assert (data["memory"], data["accuracy"]) == ("dynamic", "strict.closed_exact_match")
    assert {v["name"]: v["accuracy"] for v in data["variants"]}["fq8"] == pytest.approx(64.0)


def test_report_markdown_has_the_tables_and_the_quoted_section(built):
    text = (built.out_dir / "report.md").read_text()
    assert "### Medical VQA (ours)" in text
    assert "| Variant | Quant | VQA-RAD Open | VQA-RAD Closed |" in text
    assert "Open = LLaVA-Med v1 recall (%)" in text
    assert "| fq8 | int8 | 40.00 | 78.00 |" in text
    assert "### LLM-as-judge, LLaVA-Med GPT-4 protocol (ours)" in text
    assert re.search(r"\| fq8 \| int8 \|( 61\.50 \|){8} judge-x \|", text)
    assert "### Memory and speed (ours)" in text
    assert "| fq8 | int8 | cpu | 200.0 | 300.0 | 400.0 | 50.0 | 20.0 |" in text
    assert "Quoted from the TinyLLaVA-Med paper (published numbers, not measured here)" in text
    assert "![Pareto front, mean accuracy](pareto.png)" in text
    assert "noprof: no profile (profile.json) found" in text


def test_report_quotes_every_published_row_as_printed(built):
    text = (built.out_dir / "report.md").read_text()
    poster = "BHI 2024 poster, Medical VQA Performance table"
    assert f"| TinyLLaVA-Med-F (1.5B) | 50.6 | 81.25 | 85.34 | 85.43 | 39.25 | 90.56 | {poster} |" in text
    assert f"| LLaVA | 50 | 65.07 | 78.18 | 63.22 | 7.74 | 63.2 | {poster} |" in text  # "50" as printed
    assert text.count(poster) == 7
    assert "| TinyLLaVA-Med (earlier paper) | — | 64.54 | — | 70.70 | — | — | A. El Mir" in text
    assert ("| Model (quoted) | Conv. | Desc. | X-Ray | MRI | Histology | Gross | CT | Overall | Source / note |"
            in text)
    judge = "BHI 2024 poster, GPT-4 Evaluation table"
    assert f"| TinyLLaVA-Med-FQ4 (1.5B) | 51.6 | 38.07 | 59.42 | 41.94 | 49.43 | 49.93 | 40.42 | 48.09 | {judge} |" in text
    assert f"| TinyLLaVA (1.5B) baseline | 40.87 | 35.11 | 45.08 | 39.65 | 39.86 | 35.03 | 37 | 39.38 | {judge} |" in text
    assert text.count(judge) == 9
    assert ("Poster: A. El Mir, L. T. Luoga, B. Chen, M. A. Hanif, M. Shafique, \u201cAdvancing Healthcare in "
            "Low-Resource Environments Through an Optimization and Deployment Framework for Medical Multimodal LLMs"
            "\u201d, IEEE-EMBS") in text
    assert "arXiv:2409.12184" in text and "18.9 W" in text  # the earlier paper's row and claims stay
    assert "not verified here" not in text  # every row has its numbers


def test_report_without_judge_results_has_no_judge_table(tmp_path):
    make_variant(tmp_path / "v", "a", None, {"synthetic": 50.0}, profile(10, 20))
    result = build_report(ReportConfig(run_dirs=[tmp_path / "v"], out_dir=tmp_path / "r"))
    text = (result.out_dir / "report.md").read_text()
    assert "(ours)" in text and "LLaVA-Med GPT-4 protocol (ours)" not in text
    assert "Synthetic Closed" in text and result.front == ["a"]


def test_report_checks_quantized_layer_sizes_against_the_bit_width_targets(tmp_path):
    for name, quant, ratio in [("q8", "torch-int8", 0.25), ("q4", "bnb-nf4", 0.133), ("fat4", "quanto-int4", 0.26)]:
        prof = profile(10, 20)
        prof["static"]["quantized_layer_ratio"] = ratio
        make_variant(tmp_path / "v", name, quant, {"synthetic": 50.0}, prof)
    make_variant(tmp_path / "v", "fp32", None, {"synthetic": 50.0}, profile(40, 60))
    text = (build_report(ReportConfig(run_dirs=[tmp_path / "v"], out_dir=tmp_path / "r")).out_dir / "report.md").read_text()
    assert ("fraction of the same layers in fp32 (targets: 8-bit ≤ 30%, 4-bit ≤ 20%): fat4 (4-bit) 26.0% (NOT met); "
            "q4 (4-bit) 13.3% (met); q8 (8-bit) 25.0% (met).") in text


def test_report_html_is_self_contained_and_embeds_the_plot(built):
    html = (built.out_dir / "report.html").read_text()
    assert not re.search(r"https?://", html)
    assert not re.search(r"<(link|script)\b", html)
    assert html.count('src="data:image/png;base64,') == 3  # mean + two datasets
    assert "<style>" in html and "Quoted from the TinyLLaVA-Med paper" in html


def test_unknown_accuracy_metric_is_rejected(tmp_path):
    with pytest.raises(ValidationError, match="unknown accuracy metric 'closed'"):
        ReportConfig(run_dirs=[tmp_path], out_dir=tmp_path, accuracy="closed")


# --- CLI ----------------------------------------------------------------------------------------------------


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    app.command("noop", hidden=True)(lambda: None)  # keep `report` a named subcommand
    return app


def test_cli_report_writes_the_report(cli, variants_root, tmp_path):
    out = tmp_path / "cli-report"
    result = CliRunner().invoke(cli, ["report", str(variants_root), "--out", str(out), "--memory", "dynamic"])
    assert result.exit_code == 0, result.output
    assert "front: fp16, fq8" in result.output
    assert (out / "report.html").exists() and (out / "pareto.json").exists()


def test_cli_report_errors_name_the_problem(cli, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(cli, ["report", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 1 and "run folder not found" in missing.output
    bad_metric = runner.invoke(cli, ["report", str(tmp_path), "--out", str(tmp_path / "o"), "--accuracy", "x"])
    assert bad_metric.exit_code == 2 and "--accuracy" in bad_metric.output


def test_a_row_without_values_is_marked_not_verified(variants_root, monkeypatch, tmp_path):
    from tinymed.analysis import paper

    rows = dict(paper.paper_rows())
    rows["judge_rows"] = [*rows["judge_rows"], {"model": "Unread-7B", "values": {}, "source": None}]
    monkeypatch.setattr(paper, "paper_rows", lambda: rows)
    result = build_report(ReportConfig(run_dirs=[variants_root], out_dir=tmp_path / "r2"))
    text = (result.out_dir / "report.md").read_text()
    assert "| Unread-7B |" + " not verified here |" * 8 in text
    assert "Note: the published table rows for Unread-7B are marked 'not verified here'" in text
