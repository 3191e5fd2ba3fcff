"""The oneDNN kernel for fp32 CPU linear layers (`tinymed.models.kernels`): the same maths as PyTorch's,
applied without copying or untying weights, through every loader option (evaluate, profile, serve)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
import torch
from PIL import Image

from conftest import save_tiny_model
from tinymed.models import generate_answers
from tinymed.models.kernels import SWAP_MIN_OUT, OneDnnLinear, use_linear_kernel
from tinymed.quantize import load_for_inference
from tinymed.serve.app import ServeConfig, create_app
from tinymed.serve.background import BackgroundServer

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
QUESTIONS = ["Is there a lesion in the left lung?", "What modality is this?", "Is this axial?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, tie_embeddings=True)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (64 + 8 * i, 64), color=(40 * i, 90, 200 - 30 * i)) for i in range(len(QUESTIONS))]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(8, 48), (2, 5, 48), "strided"])
def test_onednn_layer_computes_what_linear_computes(bias, shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(48, 96, bias=bias)
    x = torch.randn(5, 96)[:, ::2] if shape == "strided" else torch.randn(*shape)
    fast = OneDnnLinear(linear)
    assert fast.weight is linear.weight and fast.bias is linear.bias
    torch.testing.assert_close(fast(x), linear(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2, 8, 16, 17])
def test_vocabulary_wide_layer_gives_the_same_rows_whichever_way_it_multiplies(rows):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, SWAP_MIN_OUT, bias=True)  # as wide as a vocabulary: few rows go through swapped
    x = torch.randn(rows, 3, 24)[:, -1:, :]  # strided, like the last position of a prompt batch
    torch.testing.assert_close(OneDnnLinear(linear)(x), linear(x), rtol=1e-5, atol=1e-5)


def test_only_plain_fp32_cpu_linears_are_routed():
    class QuantizedLinear(torch.nn.Linear):  # what quantization backends subclass
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), QuantizedLinear(4, 4), torch.nn.Linear(4, 4).to(torch.bfloat16),
                                torch.nn.Sequential(torch.nn.Linear(4, 4)))
    assert use_linear_kernel(model, "aten") == 0
    assert use_linear_kernel(model, "onednn") == 2
    assert [type(m).__name__ for m in (model[0], model[1], model[2], model[3][0])] == \
        ["OneDnnLinear", "QuantizedLinear", "Linear", "OneDnnLinear"]
    with pytest.raises(ValueError, match="unknown linear kernel"):
        use_linear_kernel(model, "blas")


def test_auto_kernel_keeps_weights_and_answers(model_dir, images):
    plain = load_for_inference(model_dir, device="cpu")
    fast = load_for_inference(model_dir, device="cpu", linear_kernel="auto")
    assert (plain.linear_kernel, fast.linear_kernel) == ("aten", "onednn")
    assert sum(isinstance(m, OneDnnLinear) for m in fast.model.modules()) > 10
    head, embed = fast.model.get_output_embeddings(), fast.model.get_input_embeddings()
    assert isinstance(head, OneDnnLinear) and head.weight is embed.weight  # still tied
    assert fast.model.state_dict().keys() == plain.model.state_dict().keys()
    expected = generate_answers(plain, images, QUESTIONS, max_new_tokens=8, batch_size=3)
    assert generate_answers(fast, images, QUESTIONS, max_new_tokens=8, batch_size=3) == expected


def test_onednn_is_refused_where_it_does_not_apply(model_dir):
    from tinymed.quantize.recipe import resolve_linear_kernel

    lm = load_for_inference(model_dir, device="cpu")
    lm.engine = "llama.cpp"
    assert resolve_linear_kernel("auto", lm) == "aten"
    with pytest.raises(ValueError, match="transformers models on the CPU"):
        resolve_linear_kernel("onednn", lm)
    with pytest.raises(ValueError, match="unknown linear kernel 'mkl'"):
        load_for_inference(model_dir, device="cpu", linear_kernel="mkl")


def test_server_reports_its_kernel_and_answers_as_evaluation_does(model_dir, images):
    from tinymed.serve.app import load_served_model

    lm = load_served_model(str(model_dir), device="cpu")  # the server's default: auto
    expected = generate_answers(lm, images[:1], QUESTIONS[:1], max_new_tokens=8)[0]
    with BackgroundServer(create_app(lm, ServeConfig(model_name="tiny"))) as server:
        assert httpx.get(server.url + "/health").json()["linear_kernel"] == "onednn"
        buf = io.BytesIO()
        images[0].save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTIONS[0]}]}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected.text


def test_evaluate_and_profile_record_the_kernel(model_dir, tmp_path):
    import json

    from tinymed.evaluate.memory import ProfileConfig, profile_model
    from tinymed.evaluate.runner import EvalConfig, evaluate

    common = dict(model=str(model_dir), dataset="synthetic", limit=6, batch_size=3, max_new_tokens=6, device="cpu")
    plain = evaluate(EvalConfig(out_dir=tmp_path / "aten", **common))
    fast = evaluate(EvalConfig(out_dir=tmp_path / "onednn", linear_kernel="onednn", **common))
    described = json.loads((tmp_path / "onednn" / "eval_config.json").read_text())
    assert described["linear_kernel"] == "onednn"
    assert json.loads((tmp_path / "aten" / "eval_config.json").read_text())["linear_kernel"] == "aten"
    assert fast.metrics == plain.metrics
    profile = profile_model(ProfileConfig(model=str(model_dir), device="cpu", linear_kernel="onednn", dynamic=False,
                                          runs=1, warmup=0, n_questions=2, batch_size=2, out_dir=tmp_path / "prof"))
    assert profile.linear_kernel == "onednn"
    assert json.loads((tmp_path / "prof" / "profile.json").read_text())["linear_kernel"] == "onednn"
