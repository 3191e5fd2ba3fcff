"""Profile: profile.json keys and units, the CPU peak measured in a child process, question-set hashing,
quantized folders' static figures, and CUDA requests failing clearly on a machine without a GPU."""

from __future__ import annotations

import json
import platform

import pytest
from PIL import Image

from tinymed.evaluate.memory import ProfileConfig, cpu_peak_memory, disk_bytes, profile_model, question_set
from conftest import save_tiny_model
from tinymed.quantize import QuantConfig, quantize_model

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
FAST = {"n_questions": 2, "batch_size": 2, "max_new_tokens": 4, "warmup": 1, "runs": 2}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, text_layers=2, text_hidden=256)


@pytest.mark.slow
def test_profile_json_has_every_figure_with_units(tiny_dir, tmp_path):
    result = profile_model(ProfileConfig(model=str(tiny_dir), device="cpu", out_dir=tmp_path, **FAST))
    saved = json.loads((tmp_path / "profile.json").read_text())
    assert saved == result.model_dump(mode="json")
    assert (saved["quant"], saved["device"], saved["dtype"]) == ("none", "cpu", "float32")
    static = saved["static"]
    assert static["unit"] == "bytes" and static["bytes"] > 1_000_000
    assert abs(static["disk_bytes"] - static["bytes"]) / static["bytes"] < 0.01  # fp32 safetensors ≈ in memory
    dynamic = saved["dynamic"]
    assert dynamic["unit"] == "bytes" and "while answering" in dynamic["method"] and "VmHWM" in dynamic["method"]
    assert ("malloc_trim" in dynamic["method"]) == (platform.libc_ver()[0] == "glibc")
    assert dynamic["peak_bytes"] > static["bytes"]  # the child loaded the weights after its baseline
    assert dynamic["load_peak_bytes"] >= dynamic["after_load_bytes"] > static["bytes"] / 2
    assert set(saved["speed"]) == {"batch_1", "batch_2"}
    for name, figure in saved["speed"].items():
        assert figure["batch_size"] == int(name.removeprefix("batch_"))
        assert figure["ttft_ms"] > 0 and figure["decode_tokens_per_s"] > 0
        assert figure["latency_ms"] >= figure["ttft_ms"]
        assert (figure["runs"], figure["warmup"], figure["new_tokens"]) == (2, 1, 4)
    assert saved["questions"]["n"] == 2 and saved["questions"]["source"] == "builtin"
    assert saved["torch"] == saved["versions"]["torch"]


def test_quantized_folder_profile_reports_its_quantized_layers(tiny_dir, tmp_path):
    qdir = tmp_path / "nf4"
    quantize_model(tiny_dir, QuantConfig(method="bnb-nf4"), qdir, device="cpu")
    result = profile_model(ProfileConfig(model=str(qdir), device="cpu", dynamic=False, **{**FAST, "runs": 1}))
    assert result.quant == "bnb-nf4" and result.dynamic is None
    assert 0.1 < result.static.quantized_layer_ratio <= 0.20
    assert result.static.quantized_layer_bytes_fp32 == 2 * 4 * 256 * (4 * 256 + 3 * 512)  # 2 layers: q,k,v,o + gate,up,down
    assert result.static.disk_bytes < 0.5 * disk_bytes(str(tiny_dir))


def test_question_set_is_deterministic_and_file_sets_differ(tmp_path):
    images, questions, builtin = question_set(None, 8)
    assert len(images) == len(questions) == 8 and question_set(None, 8)[2].sha256 == builtin.sha256
    Image.new("RGB", (32, 32), (10, 20, 30)).save(tmp_path / "a.png")
    rows = [{"id": "1", "image": "a.png", "answer_type": "CLOSED",
             "conversations": [{"from": "human", "value": "<image>\nIs it dark?"}, {"from": "gpt", "value": "yes"}]}]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    _, file_questions, from_file = question_set(tmp_path / "test.json", 8)
    assert file_questions == ["Is it dark?"] and from_file.n == 1 and from_file.sha256 != builtin.sha256


def test_cuda_requests_fail_clearly_without_a_gpu(tiny_dir):
    from typer.testing import CliRunner

    from tinymed.cli import app

    with pytest.raises(RuntimeError, match="no CUDA GPU is visible"):
        profile_model(ProfileConfig(model=str(tiny_dir), device="cuda", **FAST))
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_dir), "--device", "cuda"])
    assert result.exit_code == 1 and "no CUDA GPU" in result.output
    result = CliRunner().invoke(app, ["profile", "--model", str(tiny_dir), "--device", "cpu", "--quant", "awq"])
    known = "known: torch-int8, bnb-int8, bnb-nf4, quanto-int8, quanto-int4, quanto-int4-mixed, torchao-int8"
    assert result.exit_code == 1 and known in " ".join(result.output.split())


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux", reason="the answering-only peak needs Linux's resettable VmHWM")
def test_8_bit_variants_answer_in_less_memory_than_fp32(tmp_path):
    """Regression: recipe backends used to keep the memory-mapped fp32 checkpoint resident after quantizing,
    so an 8-bit model answered in more resident memory than the fp32 one. Weights dominate here (~70 MiB)."""
    model = save_tiny_model(tmp_path / "m", TEXTS, text_layers=6, text_hidden=768, vocab_size=2000)
    config = ProfileConfig(model=str(model), device="cpu", n_questions=2, batch_size=2, max_new_tokens=4, runs=1)
    fp32 = cpu_peak_memory(config, "cpu")
    for method in ("torch-int8", "quanto-int8"):
        int8 = cpu_peak_memory(config.model_copy(update={"quant": method}), "cpu")
        assert int8.peak_bytes < fp32.peak_bytes, (method, int8.peak_bytes, fp32.peak_bytes)
        assert int8.after_load_bytes < 0.6 * fp32.peak_bytes, (method, int8.after_load_bytes)


def test_peak_memory_child_ignores_modules_in_the_working_directory(tiny_dir, tmp_path, monkeypatch):
    """The `tinymed` command never imports from the working directory; its measuring child must not either."""
    (tmp_path / "psutil.py").write_text("raise ImportError('the working directory shadowed psutil')\n")
    monkeypatch.chdir(tmp_path)
    config = ProfileConfig(model=str(tiny_dir), device="cpu", **FAST)
    assert cpu_peak_memory(config, "cpu").peak_bytes > 0
