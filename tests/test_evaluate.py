"""Batched evaluation: predictions + metrics files, bad samples recorded, resume, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from conftest import save_tiny_model
from tinymed.evaluate.metrics import score_predictions
from tinymed.evaluate.runner import PARTIAL, EvalConfig, evaluate
from tinymed.io import read_jsonl

QA = [
    ("Is there a lesion?", "yes", "CLOSED", "PRES"),
    ("Is there a lesion?", "no", "CLOSED", "PRES"),
    ("What modality is this?", "ct", "OPEN", "MODALITY"),
    ("Which side is the mass on?", "left", "OPEN", "POS"),
    ("Is this an MRI?", "no", "CLOSED", "MODALITY"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), [q + " " + a for q, a, _, _ in QA] * 20, text_layers=2)


@pytest.fixture()
def dataset(tmp_path):
    """A conversation-format test file with 5 good images and one corrupt one."""
    (tmp_path / "images").mkdir()
    rows = []
    for i, (q, a, t, qt) in enumerate(QA):
        Image.new("RGB", (40, 40), (40 * i, 20, 200)).save(tmp_path / "images" / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"images/{i}.png", "answer_type": t, "question_type": qt,
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (tmp_path / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows.append({"id": "broken", "image": "images/bad.png", "answer_type": "CLOSED",
                 "conversations": [{"from": "human", "value": "Is it broken?"}, {"from": "gpt", "value": "yes"}]})
    path = tmp_path / "test.json"
    path.write_text(json.dumps(rows))
    return path


def test_evaluate_writes_predictions_and_matching_metrics(tiny_model, dataset, tmp_path):
    out = tmp_path / "eval"
    result = evaluate(EvalConfig(model=str(tiny_model), dataset="llava-med", path=str(dataset), out_dir=out,
                                 batch_size=4, max_new_tokens=4, device="cpu"))
    records = read_jsonl(out / "predictions.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3", "q4", "broken"]
    broken = records[-1]
    assert broken["prediction"] == "" and "bad.png" in broken["error"]
    assert all(r["error"] is None for r in records[:-1])
    assert records[2]["question_type"] == "MODALITY" and records[2]["answer"] == "ct"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == {**json.loads(json.dumps(score_predictions(records))),
                     "image_control": {"kind": "none", "seed": None}}
    assert result.errors == 1 and saved["errors"] == 1 and saved["n"] == 6
    config = json.loads((out / "eval_config.json").read_text())
    assert config["dataset"] == "llava-med" and config["quant"] == "none" and config["batch_size"] == 4
    assert not (out / PARTIAL).exists()


def test_batch_size_does_not_change_answers(tiny_model, dataset, tmp_path):
    runs = {}
    for batch_size in (1, 5):
        out = tmp_path / f"b{batch_size}"
        evaluate(EvalConfig(model=str(tiny_model), dataset="llava-med", path=str(dataset), out_dir=out,
                            batch_size=batch_size, max_new_tokens=5, device="cpu"))
        runs[batch_size] = [r["prediction"] for r in read_jsonl(out / "predictions.jsonl")]
    assert runs[1] == runs[5]


def test_interrupted_run_resumes_only_the_missing_samples(tiny_model, dataset, tmp_path, monkeypatch):
    out = tmp_path / "eval"
    config = EvalConfig(model=str(tiny_model), dataset="llava-med", path=str(dataset), out_dir=out,
                        batch_size=2, max_new_tokens=3, device="cpu")
    calls = []

    def crash_after_first_batch(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate(config, on_progress=crash_after_first_batch)
    assert len(read_jsonl(out / PARTIAL)) == 2 and not (out / "predictions.jsonl").exists()
    seen = []
    evaluate(config, on_progress=lambda done, total: seen.append(done))
    assert seen[0] == 2  # the two finished samples were not asked again
    assert len(read_jsonl(out / "predictions.jsonl")) == 6


def test_finished_run_is_returned_not_repeated_until_its_weights_change(tiny_model, dataset, tmp_path):
    out = tmp_path / "eval"
    config = EvalConfig(model=str(tiny_model), dataset="llava-med", path=str(dataset), out_dir=out,
                        batch_size=3, max_new_tokens=3, device="cpu")
    first = evaluate(config)
    progress = []
    again = evaluate(config, on_progress=lambda done, total: progress.append(done))
    assert progress == [] and again.metrics == first.metrics and again.n == first.n == 6
    weights = next(tiny_model.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # retrained in place
    evaluate(config, on_progress=lambda done, total: progress.append(done))
    assert progress[0] == 0 and progress[-1] == 6  # every question answered anew
    progress.clear()
    evaluate(config.model_copy(update={"resume": False}), on_progress=lambda done, total: progress.append(done))
    assert progress[-1] == 6  # --fresh answers anew too


def test_limit_and_cli(tiny_model, dataset, tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "tinymed.cli", "evaluate", "--model", str(tiny_model), "--dataset", "llava-med",
         "--path", str(dataset), "--out", str(out), "--limit", "3", "--max-new-tokens", "3", "--device", "cpu"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(read_jsonl(out / "predictions.jsonl")) == 3
    scored = subprocess.run([sys.executable, "-m", "tinymed.cli", "score", str(out / "predictions.jsonl"), "--json"],
                            capture_output=True, text=True, timeout=60)
    saved = json.loads((out / "metrics.json").read_text())
    assert json.loads(scored.stdout) == {key: value for key, value in saved.items() if key != "image_control"}


def test_model_or_endpoint_must_be_given(tmp_path):
    with pytest.raises(ValueError, match="exactly one"):
        evaluate(EvalConfig(dataset="llava-med", path="x", out_dir=tmp_path))
