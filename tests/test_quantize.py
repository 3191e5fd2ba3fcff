"""Quantize stage: registry, what gets quantized, static-memory ratios, save → reload, the one loader."""

from __future__ import annotations

import json
import subprocess
import sys

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
    default_demo_quant,
    get_backend,
    load_for_inference,
    module_bytes,
    quantize_model,
    quantized_module_names,
    read_recipe,
)

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
QUESTIONS = ["Is there a lesion?", "What modality is this image?", "Which side is the mass on?"]
METHODS = ["torch-int8", "bnb-int8", "bnb-nf4", "quanto-int8", "quanto-int4", "quanto-int4-mixed", "torchao-int8"]
CORE_METHODS = METHODS[:3]  # need no optional library
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


def test_registry_lists_backends_and_devices(monkeypatch):
    assert list(BACKENDS) == METHODS
    assert {b.bits for b in BACKENDS.values()} == {8, 4}
    assert available_methods("cpu") == METHODS
    assert available_methods("cuda:0") == METHODS[1:]
    assert default_demo_quant("cpu") == [
        QuantConfig(method="quanto-int8", compute_dtype="bfloat16"),
        QuantConfig(method="quanto-int4", compute_dtype="bfloat16"),
    ]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the CUDA choice, without a GPU
    assert [q.method for q in default_demo_quant("cuda")] == ["bnb-int8", "bnb-nf4"]


def test_unsupported_method_or_device_lists_what_is_available():
    with pytest.raises(ValueError, match="needs cpu.*available on cuda: bnb-int8, bnb-nf4, quanto-int8, quanto-int4, quanto-int4-mixed, tor"):
        get_backend("torch-int8", "cuda")
    with pytest.raises(ValueError, match="unknown quantization method 'gptq'; known: torch-int8, bnb-int8, bnb-nf4, qu"):
        get_backend("gptq", "cpu")
    with pytest.raises(ValueError, match=r"unknown quantization targets \['tokenizer'\]"):
        QuantConfig(method="bnb-nf4", targets={"tokenizer": True})


def test_backends_whose_library_is_missing_are_not_offered(tiny_dir, monkeypatch):
    monkeypatch.delitem(sys.modules, "optimum.quanto", raising=False)
    monkeypatch.setitem(sys.modules, "optimum", None)  # as if optimum-quanto were not installed
    monkeypatch.setitem(sys.modules, "torchao", None)
    assert available_methods("cpu") == CORE_METHODS
    assert [q.method for q in default_demo_quant("cpu")] == ["bnb-int8", "bnb-nf4"]  # the fallback pair
    pip = r"not installed: pip install 'tinymed\[extra-backends\]'"
    with pytest.raises(ValueError, match=f"'quanto-int4' needs optimum-quanto, {pip}"):
        get_backend("quanto-int4", "cpu")
    with pytest.raises(ValueError, match=f"'torchao-int8' needs torchao, {pip}"):
        load_for_inference(tiny_dir, device="cpu", quant="torchao-int8")


def test_registry_imports_no_optional_library():
    code = (
        "import sys, tinymed.quantize as q; q.available_methods('cpu'); q.get_backend('quanto-int4', 'cpu');"
        "print(sorted(m for m in ('optimum.quanto', 'torchao', 'bitsandbytes', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("method", METHODS)
def test_default_quantizes_only_the_llm_linears(tiny_dir, quantized, method):
    plain = load_for_inference(tiny_dir, device="cpu").model
    result = quantized[method]
    assert result.quantized_modules == _llm_linears(plain)
    lm = load_for_inference(result.out_dir, device="cpu")
    assert quantized_module_names(lm.model, BACKENDS[method]) == result.quantized_modules
    for untouched in ("lm_head", "model.multi_modal_projector.linear_1", "model.vision_tower.encoder.layers.0.mlp.fc1"):
        layer = lm.model.get_submodule(untouched)  # torchao keeps nn.Linear and swaps the weight: check both
        assert (type(layer), type(layer.weight)) == (torch.nn.Linear, torch.nn.Parameter), untouched
    assert type(lm.model.get_input_embeddings()) is torch.nn.Embedding


@pytest.mark.parametrize("method", ["torch-int8", "bnb-nf4", "quanto-int4", "torchao-int8"])
def test_projector_and_lm_head_are_quantized_when_asked(tiny_dir, tmp_path, method):
    config = QuantConfig(method=method, targets={"llm": False, "projector": True, "lm_head": True})
    result = quantize_model(tiny_dir, config, tmp_path / method, device="cpu")
    assert result.quantized_modules == ["model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2", "lm_head"]


def test_embeddings_are_quantized_when_asked_by_a_backend_that_can(tiny_dir, tmp_path):
    config = QuantConfig(method="torch-int8", targets={"llm": False, "embeddings": True})
    result = quantize_model(tiny_dir, config, tmp_path / "e", device="cpu")
    assert result.quantized_modules == ["model.language_model.embed_tokens"]
    embedding = load_for_inference(tiny_dir, device="cpu").model.get_input_embeddings()
    rows, dim = embedding.weight.shape  # uint8 per value + a float32 scale and offset per row
    assert result.quantized_layer_bytes_after == rows * dim + 8 * rows
    assert result.quantized_layer_bytes_fp32 == 4 * rows * dim
    fresh, reloaded = load_for_inference(tiny_dir, device="cpu", quant=config), load_for_inference(result.out_dir, device="cpu")
    assert isinstance(reloaded.model.get_input_embeddings(), torch.ao.nn.quantized.Embedding)
    torch.testing.assert_close(_logits(reloaded), _logits(fresh), rtol=0, atol=0)
    reference = _logits(load_for_inference(tiny_dir, device="cpu"))
    assert (_logits(reloaded) - reference).norm() / reference.norm() < 0.05
    with pytest.raises(ValueError, match="bnb-nf4 does not quantize embeddings; methods that do: torch-int8"):
        quantize_model(tiny_dir, config.model_copy(update={"method": "bnb-nf4"}), tmp_path / "nf4", device="cpu")


@pytest.mark.parametrize("method", METHODS)
def test_quantized_layers_static_bytes_ratio(quantized, method):
    result = quantized[method]
    ratio = result.quantized_layer_bytes_after / result.quantized_layer_bytes_fp32
    assert 0.1 < ratio <= MAX_RATIO[BACKENDS[method].bits]
    assert result.static_bytes_after < result.static_bytes_before
    lm = load_for_inference(result.out_dir, device="cpu")
    assert module_bytes(lm.model) == result.static_bytes_after  # the reloaded model holds what was measured


def _hand_counted_bytes(method: str, rows: int, cols: int) -> int:
    """Bytes of one bias-free rows × cols linear, counted by hand from each format's layout."""
    return {
        "torch-int8": rows * cols + 8 + 8,  # int8 data, one float64 scale, one int64 zero point
        "quanto-int8": rows * cols + 4 * rows + 8,  # int8 data, fp32 scale per row, two fp32 scalar buffers
        # two 4-bit values per byte, fp32 scale and fp32 shift per group of 128, two fp32 scalar buffers
        "quanto-int4": rows * cols // 2 + 2 * 4 * (rows * cols // 128) + 8,
        "torchao-int8": rows * cols + 4 * rows + rows,  # int8 data, fp32 scale and int8 zero point per row
    }[method]


@pytest.mark.parametrize("method", ["torch-int8", "quanto-int8", "quanto-int4", "torchao-int8"])
def test_quantized_layer_bytes_match_a_hand_count(quantized, method):
    layers = load_for_inference(quantized[method].out_dir, device="cpu").model.get_submodule("model.language_model.layers.0")
    for name, (rows, cols) in {"self_attn.q_proj": (256, 256), "mlp.up_proj": (512, 256), "mlp.down_proj": (256, 512)}.items():
        assert module_bytes(layers.get_submodule(name)) == _hand_counted_bytes(method, rows, cols), name


def test_mixed_int4_keeps_value_and_down_projections_in_int8(quantized):
    layers = load_for_inference(quantized["quanto-int4-mixed"].out_dir, device="cpu").model.get_submodule(
        "model.language_model.layers.0")
    shapes = {"self_attn.q_proj": (256, 256), "self_attn.v_proj": (256, 256), "mlp.up_proj": (512, 256),
              "mlp.down_proj": (256, 512)}
    for name, (rows, cols) in shapes.items():
        kind = "quanto-int8" if name in ("self_attn.v_proj", "mlp.down_proj") else "quanto-int4"
        assert module_bytes(layers.get_submodule(name)) == _hand_counted_bytes(kind, rows, cols), name


@pytest.mark.parametrize("method", METHODS)
def test_reloaded_model_predicts_like_the_freshly_quantized_one(tiny_dir, quantized, method):
    fresh = load_for_inference(tiny_dir, device="cpu", quant=method)
    reloaded = load_for_inference(quantized[method].out_dir, device="cpu")
    assert (fresh.quant, reloaded.quant) == (method, method)
    torch.testing.assert_close(_logits(reloaded), _logits(fresh), rtol=0, atol=0)
    ask = (_images(3), QUESTIONS)
    assert [a.text for a in generate_answers(reloaded, *ask, max_new_tokens=5)] == [
        a.text for a in generate_answers(fresh, *ask, max_new_tokens=5)
    ]


def test_quanto_int4_in_bfloat16_reloads_and_answers(tiny_dir, tmp_path):
    """bfloat16 is quanto-int4's fast CPU path (a packed int4 kernel); it must survive inference_mode too."""
    config = QuantConfig(method="quanto-int4", compute_dtype="bfloat16")
    result = quantize_model(tiny_dir, config, tmp_path / "q", device="cpu")
    assert result.quantized_layer_ratio <= MAX_RATIO[4]
    first, second = (load_for_inference(result.out_dir, device="cpu") for _ in range(2))
    torch.testing.assert_close(_logits(second), _logits(first), rtol=0, atol=0)
    on_the_fly = load_for_inference(tiny_dir, device="cpu", quant=config)  # a full config, not just a method name
    assert on_the_fly.model.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(on_the_fly), _logits(first), rtol=0, atol=0)
    assert len(generate_answers(first, _images(2), QUESTIONS[:2], max_new_tokens=3)) == 2


@pytest.mark.parametrize(
    ("method", "max_rel_err"),
    [("torch-int8", 0.15), ("bnb-int8", 0.15), ("bnb-nf4", 0.6),
     ("quanto-int8", 0.15), ("quanto-int4", 0.6), ("quanto-int4-mixed", 0.6), ("torchao-int8", 0.15)],
)
def test_quantized_logits_stay_close_to_fp32(tiny_dir, quantized, method, max_rel_err):
    reference = _logits(load_for_inference(tiny_dir, device="cpu"))
    error = (_logits(load_for_inference(quantized[method].out_dir, device="cpu")) - reference).norm() / reference.norm()
    assert 0 < error < max_rel_err


def test_mixed_int4_is_closer_to_fp32_than_int4(tiny_dir, quantized):
    reference = _logits(load_for_inference(tiny_dir, device="cpu"))
    error = {m: (_logits(load_for_inference(quantized[m].out_dir, device="cpu")) - reference).norm()
             for m in ("quanto-int4", "quanto-int4-mixed", "quanto-int8")}
    assert error["quanto-int8"] < error["quanto-int4-mixed"] < error["quanto-int4"]


def test_recipe_records_what_was_done(quantized):
    recipe = json.loads((quantized["torch-int8"].out_dir / RECIPE_FILE).read_text())
    assert recipe["method"] == "torch-int8" and recipe["serialization"] == "recipe"
    assert recipe["config"]["targets"] == {
        "llm": True, "projector": False, "vision": False, "lm_head": False, "embeddings": False
    }
    assert len(recipe["quantized_modules"]) == 14 and "torch" in recipe["versions"]
    assert json.loads((quantized["bnb-nf4"].out_dir / RECIPE_FILE).read_text())["serialization"] == "backend"
    quanto = json.loads((quantized["quanto-int4"].out_dir / RECIPE_FILE).read_text())
    assert quanto["serialization"] == "recipe" and "optimum-quanto" in quanto["versions"]


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
    args = ["quantize", "--model", str(tiny_dir), "--method", "torch-int8", "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--embeddings"])
    assert result.exit_code == 0, result.output
    assert "15 layers quantized" in result.output  # 14 LLM linears + the token embedding
    assert load_for_inference(out, device="cpu").quant == "torch-int8"
    assert read_recipe(out).config.targets["embeddings"] is True
    no_embeddings = CliRunner().invoke(app, [*args[:4], "bnb-nf4", *args[5:], "--embeddings"])
    assert no_embeddings.exit_code == 1 and "bnb-nf4 does not quantize embeddings" in no_embeddings.output
    bad = CliRunner().invoke(app, ["quantize", "--model", str(tiny_dir), "--method", "torch-int8", "--device", "cuda"])
    assert bad.exit_code == 1


def test_cli_output_has_no_torchao_import_chatter(tiny_dir, tmp_path):
    """torchao (loaded by every transformers model import) logs CUDA-kernel load failures on a CPU torch."""
    cmd = [sys.executable, "-m", "tinymed.cli", "quantize", "--model", str(tiny_dir), "--method", "torchao-int8",
           "--out", str(tmp_path / "q"), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "14 layers quantized" in proc.stdout
    assert "Failed to load" not in proc.stderr and "register_constant" not in proc.stderr
