"""A served model (plain or quantized) is scored by exactly the same metrics as a local one, and tinymed's
own server can be the LLM judge (end to end over real HTTP on loopback)."""

from __future__ import annotations

import json

import httpx
import pytest
from PIL import Image

from conftest import save_tiny_model
from tinymed.evaluate.judge import EndpointConfig, JudgeConfig, run_judge
from tinymed.evaluate.runner import EvalConfig, evaluate
from tinymed.io import read_jsonl
from tinymed.models import load_model
from tinymed.quantize import QuantConfig, load_for_inference, quantize_model
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer

QA = [("Is there a lesion?", "yes", "CLOSED"), ("What modality is this?", "ct", "OPEN"),
      ("Is this an MRI?", "no", "CLOSED"), ("Which side is the mass on?", "left", "OPEN")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), [q + " " + a for q, a, _ in QA] * 20, text_layers=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    rows = []
    for i, (q, a, t) in enumerate(QA):
        Image.new("RGB", (50, 40), (60 * i, 120, 30)).save(folder / f"{i}.png")
        rows.append({"id": f"q{i}", "image": f"{i}.png", "answer_type": t, "modality": "CT" if i % 2 else "MRI",
                     "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]})
    (folder / "test.json").write_text(json.dumps(rows))
    return folder / "test.json"


@pytest.fixture(scope="module")
def server(model_dir):
    lm = load_model(model_dir, device="cpu")
    with BackgroundServer(create_app(lm, ServeConfig(model_name="tiny"))) as srv:
        yield srv


def test_evaluate_endpoint_equals_local_evaluation(model_dir, dataset, server, tmp_path):
    common = dict(dataset="llava-med", path=str(dataset), batch_size=2, max_new_tokens=6, device="cpu")
    local = evaluate(EvalConfig(model=str(model_dir), out_dir=tmp_path / "local", **common))
    served = evaluate(EvalConfig(endpoint=server.url + "/v1", model_name="tiny", out_dir=tmp_path / "served", **common))
    assert [r["prediction"] for r in read_jsonl(tmp_path / "local" / "predictions.jsonl")] == \
        [r["prediction"] for r in read_jsonl(tmp_path / "served" / "predictions.jsonl")]
    assert local.metrics == served.metrics
    assert json.loads((tmp_path / "served" / "eval_config.json").read_text())["endpoint"] == server.url + "/v1"


def test_tinymed_server_as_the_llm_judge(dataset, server, tmp_path):
    """The protocol runs end to end against our own server; a tiny random model cannot produce the
    two-score line, so every item is a counted failure — never a crash, never a silent zero."""
    predictions = tmp_path / "pred.jsonl"
    predictions.write_text("".join(json.dumps({"id": f"q{i}", "prediction": a}) + "\n" for i, (_, a, _) in enumerate(QA)))
    judge = EndpointConfig(base_url=server.url + "/v1", model="tiny", max_tokens=8, max_attempts=2, backoff_base_s=0.01)
    config = JudgeConfig(questions=str(dataset), dataset="llava-med", answers=str(predictions),
                         out=str(tmp_path / "judge"), judge=judge)
    result = run_judge(config)
    assert len(result.reviews) == len(QA)
    assert result.summary.requests >= len(QA)
    parsed = [r for r in result.reviews if r.scores is not None]
    assert result.summary.failures == len(QA) - len(parsed)
    assert all(r.error for r in result.reviews if r.scores is None)
    summary = json.loads((tmp_path / "judge" / "judge_summary.json").read_text())
    assert summary["failures"] == result.summary.failures
    rerun = run_judge(config)  # parsed replies come from the cache; unparsed ones are asked again
    assert rerun.summary.cached >= len(parsed)


@pytest.mark.parametrize("method", ["torch-int8", "bnb-nf4"])
def test_quantized_folder_served_equals_quantized_folder_evaluated(model_dir, dataset, tmp_path, method):
    folder = quantize_model(model_dir, QuantConfig(method=method), tmp_path / method, device="cpu").out_dir
    common = dict(dataset="llava-med", path=str(dataset), batch_size=2, max_new_tokens=6, device="cpu")
    local = evaluate(EvalConfig(model=str(folder), out_dir=tmp_path / "local", **common))
    lm = load_for_inference(folder, device="cpu")
    with BackgroundServer(create_app(lm, ServeConfig(model_name="q"))) as server:
        health = httpx.get(server.url + "/health").json()
        served = evaluate(EvalConfig(endpoint=server.url + "/v1", model_name="q", out_dir=tmp_path / "served", **common))
    assert health["quant"] == method
    assert json.loads((tmp_path / "local" / "eval_config.json").read_text())["quant"] == method
    assert [r["prediction"] for r in read_jsonl(tmp_path / "local" / "predictions.jsonl")] == \
        [r["prediction"] for r in read_jsonl(tmp_path / "served" / "predictions.jsonl")]
    assert local.metrics == served.metrics
