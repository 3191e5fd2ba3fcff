"""Quantize stage: registry, what gets quantized, static-memory ratios, save → reload, the one loader."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import save_tiny_model
from tinymed.models import generate_answers, prepare_inputs
from tinymed.quantize import (
    BACKENDS,
    RECIPE_FILE,
    QuantConfig,
    available_methods,
    default_demo_methods,
    get_backend,
    load_for_inference,
    module_bytes,
    quantize_model,
    quantized_module_names,
)

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
QUESTIONS = ["Is there a lesion?", "What modality is this image?", "Which side is the mass on?"]
METHODS = ["torch-int8", "bnb-int8", "bnb-nf4"]
MAX_RATIO = {8: 0.30, 4: 0.20}  # quantized layers' bytes vs the same layers in fp32 (acceptance criterion)


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 64), color=(40 * i, 90, 200 - 30 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, text_layers=2, text_hidden=256)


@pytest.fixture(scope="module")
def quantized(tiny_dir, tmp_path_factory):
    """method → QuantResult of the default targets (the LLM's linear layers)."""
    root = tmp_path_factory.mktemp("quantized")
    return {m: quantize_model(tiny_dir, QuantConfig(method=m), root / m, device="cpu") for m in METHODS}


def _logits(lm) -> torch.Tensor:
    with torch.no_grad():
        return lm.model(**prepare_inputs(lm, _images(2), QUESTIONS[:2])).logits.float()


def _llm_linears(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("model.language_model.")]


def test_registry_lists_backends_and_devices():
    assert list(BACKENDS) == ["torch-int8", "bnb-int8", "bnb-nf4"]
    assert {b.bits for b in BACKENDS.values()} == {8, 4}
    assert available_methods("cpu") == METHODS
    assert available_methods("cuda:0") == ["bnb-int8", "bnb-nf4"]
    assert default_demo_methods("cpu") == ["torch-int8", "bnb-nf4"]


def test_unsupported_method_or_device_lists_what_is_available():
    with pytest.raises(ValueError, match="needs cpu.*available on cuda: bnb-int8, bnb-nf4"):
        get_backend("torch-int8", "cuda")
    with pytest.raises(ValueError, match="unknown quantization method 'gptq'; known: torch-int8, bnb-int8, bnb-nf4"):
        get_backend("gptq", "cpu")
    with pytest.raises(ValueError, match="unknown quantization targets"):
        QuantConfig(method="bnb-nf4", targets={"embeddings": True})


@pytest.mark.parametrize("method", METHODS)
def test_default_quantizes_only_the_llm_linears(tiny_dir, quantized, method):
    plain = load_for_inference(tiny_dir, device="cpu").model
    result = quantized[method]
    assert result.quantized_modules == _llm_linears(plain)
    lm = load_for_inference(result.out_dir, device="cpu")
    assert quantized_module_names(lm.model, BACKENDS[method]) == result.quantized_modules
    for untouched in ("lm_head", "model.multi_modal_projector.linear_1", "model.vision_tower.encoder.layers.0.mlp.fc1"):
        assert type(lm.model.get_submodule(untouched)) is torch.nn.Linear, untouched
    assert type(lm.model.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.parametrize("method", ["torch-int8", "bnb-nf4"])
def test_projector_and_lm_head_are_quantized_when_asked(tiny_dir, tmp_path, method):
    config = QuantConfig(method=method, targets={"llm": False, "projector": True, "lm_head": True})
    result = quantize_model(tiny_dir, config, tmp_path / method, device="cpu")
    assert result.quantized_modules == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"]


@pytest.mark.parametrize("method", METHODS)
def test_quantized_layers_static_bytes_ratio(quantized, method):
    result = quantized[method]
    ratio = result.quantized_layer_bytes_after / result.quantized_layer_bytes_fp32
    assert 0.1 < ratio <= MAX_RATIO[BACKENDS[method].bits]
    assert result.static_bytes_after < result.static_bytes_before
    lm = load_for_inference(result.out_dir, device="cpu")
    assert module_bytes(lm.model) == result.static_bytes_after  # the reloaded model holds what was measured


@pytest.mark.parametrize("method", METHODS)
def test_reloaded_model_predicts_like_the_freshly_quantized_one(tiny_dir, quantized, method):
    fresh = load_for_inference(tiny_dir, device="cpu", quant=method)
    reloaded = load_for_inference(quantized[method].out_dir, device="cpu")
    assert (fresh.quant, reloaded.quant) == (method, method)
    torch.testing.assert_close(_logits(reloaded), _logits(fresh), rtol=0, atol=1e-5)
    ask = (_images(3), QUESTIONS)
    assert [a.text for a in generate_answers(reloaded, *ask, max_new_tokens=5)] == [
        a.text for a in generate_answers(fresh, *ask, max_new_tokens=5)
    ]


@pytest.mark.parametrize(("method", "max_rel_err"), [("torch-int8", 0.15), ("bnb-int8", 0.15), ("bnb-nf4", 0.6)])
def test_quantized_logits_stay_close_to_fp32(tiny_dir, quantized, method, max_rel_err):
    reference = _logits(load_for_inference(tiny_dir, device="cpu"))
    error = (_logits(load_for_inference(quantized[method].out_dir, device="cpu")) - reference).norm() / reference.norm()
    assert 0 < error < max_rel_err


def test_recipe_records_what_was_done(quantized):
    recipe = json.loads((quantized["torch-int8"].out_dir / RECIPE_FILE).read_text())
    assert recipe["method"] == "torch-int8" and recipe["serialization"] == "recipe"
    assert recipe["config"]["targets"] == {"llm": True, "projector": False, "vision": False, "lm_head": False}
    assert len(recipe["quantized_modules"]) == 14 and "torch" in recipe["versions"]
    assert json.loads((quantized["bnb-nf4"].out_dir / RECIPE_FILE).read_text())["serialization"] == "backend"


def test_loader_plain_folder_and_errors(tiny_dir, quantized):
    assert load_for_inference(tiny_dir, device="cpu", quant="none").quant == "none"
    with pytest.raises(ValueError, match="already quantized with 'bnb-nf4'"):
        load_for_inference(quantized["bnb-nf4"].out_dir, device="cpu", quant="torch-int8")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_for_inference(tiny_dir, device="cuda", quant="bnb-nf4")
    with pytest.raises(ValueError, match="known: torch-int8"):
        load_for_inference(tiny_dir, device="cpu", quant="int3")


def test_cli_quantize_writes_a_reloadable_folder(tiny_dir, tmp_path):
    from typer.testing import CliRunner

    from tinymed.cli import app

    out = tmp_path / "q"
    result = CliRunner().invoke(app, ["quantize", "--model", str(tiny_dir), "--method", "torch-int8", "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "14 layers quantized" in result.output
    assert load_for_inference(out, device="cpu").quant == "torch-int8"
    bad = CliRunner().invoke(app, ["quantize", "--model", str(tiny_dir), "--method", "torch-int8", "--device", "cuda"])
    assert bad.exit_code == 1
