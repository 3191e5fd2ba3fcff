"""The llama.cpp engine: an edge folder (see `gguf`) answering image questions on a CPU.

The processor builds the same prompt ids and pixels as the transformers engine; the vision tower and
projector (PyTorch) turn the pixels into one vector per image position; llama.cpp then reads the
prompt in pieces — runs of token ids, and the image positions' vectors as input embeddings (a
llama.cpp batch holds either) — and decodes greedily, one sequence at a time. Gemma-3 scales token
embeddings by √d inside llama.cpp but not input embeddings, as transformers does for image features.

A folder exported with a trimmed vocabulary (`vocab`) holds fewer embedding rows than the tokenizer
has ids: prompt ids are mapped to kept rows (a dropped token is re-spelled from kept pieces by
llama.cpp's tokenizer over the trimmed vocabulary) and chosen rows back to tokenizer ids, so callers
see tokenizer ids either way.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tinymed.models.gguf import (
    EDGE_MANIFEST,
    INSTALL_HINT,
    VISION_PARTS,
    VISION_WEIGHTS,
    quantized_tensor_bytes,
    quiet_llama_cpp,
)
from tinymed.models.vocab import VocabularyPlan

DEFAULT_CONTEXT = 1024  # tokens: the prompt (image included) plus the answer
MAX_DEFAULT_THREADS = 8
THREADS_ENV = "TINYMED_LLAMA_THREADS"


def default_threads() -> int:
    """llama.cpp threads when none are given: `TINYMED_LLAMA_THREADS` if set, else the physical cores this
    process may run on (llama.cpp's own default; hyperthread siblings share one core's units), at most
    `MAX_DEFAULT_THREADS`: a decode step of a ≤ 1B model is a few hundred tiny operations, each split over
    every thread with a barrier between them, so a many-core machine gains little from more threads."""
    value = os.environ.get(THREADS_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{THREADS_ENV} must be a positive number of threads, got {value!r}")
        return int(value)
    allowed = os.sched_getaffinity(0)
    cores = set()
    for cpu in allowed:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        cores.add(siblings.read_text().strip() if siblings.is_file() else str(cpu))
    return max(1, min(len(cores), MAX_DEFAULT_THREADS))


def is_edge_folder(path: str | Path) -> bool:
    return (Path(path) / EDGE_MANIFEST).is_file()


def read_manifest(folder: str | Path) -> dict:
    return json.loads((Path(folder) / EDGE_MANIFEST).read_text(encoding="utf-8"))


class VisionPart:
    """The vision tower + projector of an edge folder, in PyTorch (float32, CPU)."""

    def __init__(self, folder: Path):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForImageTextToText

        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):  # the language model is never materialized
            skeleton = AutoModelForImageTextToText.from_config(config)
        inner = skeleton.model
        weights = load_file(str(folder / VISION_WEIGHTS))
        for part in VISION_PARTS:
            module = getattr(inner, part).to_empty(device="cpu")
            prefix = f"{part}."
            module.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)},
                                   strict=True)
        self.inner = inner.eval()

    def features(self, pixel_values):
        """(image positions, hidden) float32 vectors for one image's pixel_values (1, 3, H, W)."""
        import torch

        with torch.no_grad():
            out = self.inner.get_image_features(pixel_values=pixel_values.float())
        features = getattr(out, "pooler_output", out)
        if isinstance(features, (list, tuple)):
            features = torch.cat(list(features))
        return features.reshape(-1, features.shape[-1]).float().contiguous()


def refuse_amx_build(llama_cpp) -> None:
    """Raise before loading anything when llama-cpp-python was compiled with ggml's AMX kernels, which
    segfault inside llama_decode (a q4_0 tiny Gemma on this project's AMX VM, gdb backtrace in
    ggml_backend_amx_mul_mat, 2026-12-05; likely also that day's CI crash in an f16 test, as ggml
    routes F16 matmuls to the same kernels): a clear error, not a dead server or evaluation."""
    if b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info():
        raise RuntimeError("this llama-cpp-python was compiled with ggml's AMX kernels, which crash llama.cpp "
                           f"on this model; rebuild it without them: {INSTALL_HINT}")


class LlamaCppModel:
    """An edge folder loaded for answering. Not thread-safe: one caller at a time."""

    def __init__(self, folder: str | Path, n_threads: int | None = None, n_ctx: int = DEFAULT_CONTEXT):
        import numpy as np

        try:
            import llama_cpp
        except ImportError as exc:
            raise RuntimeError(f"{folder} is a llama.cpp edge folder; answering with it needs llama-cpp-python: "
                               f"{INSTALL_HINT}") from exc
        refuse_amx_build(llama_cpp)
        self.lib = llama_cpp
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.image_token_id = int(self.manifest["image_token_id"])
        self.vision = VisionPart(self.folder)
        llama_cpp.llama_backend_init()
        quiet_llama_cpp(llama_cpp)
        gguf = self.folder / self.manifest["gguf"]
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        threads = n_threads or default_threads()
        params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = n_ctx, n_ctx, n_ctx, 1
        params.n_threads, params.n_threads_batch = threads, threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens for {gguf}")
        self.n_ctx = n_ctx
        self.rng = np.random.default_rng()
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.kept = self.rows = None  # row -> tokenizer id, tokenizer id -> row (-1: dropped); trimmed only
        if "vocabulary" in self.manifest:
            plan = VocabularyPlan.from_json(json.loads((self.folder / self.manifest["vocabulary"]).read_text()))
            self.kept = np.asarray(plan.kept, dtype=np.int64)
            self.rows = np.full(plan.source_size, -1, dtype=np.int64)
            self.rows[self.kept] = np.arange(len(self.kept))
            self._tokenizer = None
        self.image_row = self._engine_ids([self.image_token_id])[0]  # where the image vectors go

    @property
    def quant(self) -> str:
        head = "-untied-head" if self.manifest.get("untied_head") else ""
        return f"llama.cpp-{self.manifest['quant']}{head}"

    @property
    def weights_dtype(self) -> str:
        """What `profile` reports as the dtype: the GGUF file type of the LM."""
        return f"gguf-{self.manifest['quant']}"

    def static_bytes(self) -> int:
        """Bytes of the weights: the GGUF file (llama.cpp maps it whole) + the vision part's tensors."""
        vision = sum(t.numel() * t.element_size() for part in VISION_PARTS
                     for t in (*getattr(self.vision.inner, part).parameters(),
                               *getattr(self.vision.inner, part).buffers()))
        return (self.folder / self.manifest["gguf"]).stat().st_size + vision

    def quantized_bytes(self) -> tuple[int, int]:
        """(bytes, float32 bytes) of the GGUF tensors llama.cpp quantized (`quantized_tensor_bytes`)."""
        return quantized_tensor_bytes(self.folder / self.manifest["gguf"])

    def answer_ids(self, input_ids: Sequence[int], pixel_values, max_new_tokens: int, stop_ids: set[int],
                   min_new_tokens: int = 0, temperature: float = 0.0,
                   on_token: Callable[[list[int]], bool] | None = None) -> list[int]:
        """New token ids for one prompt (ids with the image positions marked by the image token): greedy
        at temperature 0, else sampled from softmax(logits / temperature) (as transformers with top_p 1).

        A stop id ends the answer (and is not returned); none is chosen before `min_new_tokens` are out.
        `on_token` sees the chosen ids so far, the newest last (possibly a stop id), after each choice; True
        stops."""
        import numpy as np

        ids = self._engine_ids(input_ids)
        if len(ids) + max_new_tokens > self.n_ctx:
            raise ValueError(f"prompt of {len(ids)} tokens + {max_new_tokens} new tokens exceeds the "
                             f"llama.cpp context of {self.n_ctx}")
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        vectors = self.vision.features(pixel_values).numpy() if pixel_values is not None else None
        self._prefill(ids, vectors)
        stop_rows = self._engine_ids(sorted(stop_ids))  # special tokens: kept by any trimmed vocabulary
        new: list[int] = []
        while True:
            logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
            if len(new) < min_new_tokens:  # no end of answer yet, as transformers' min_new_tokens
                logits = logits.copy()
                logits[stop_rows] = -np.inf
            row = self._choose(logits, temperature)
            token = row if self.kept is None else int(self.kept[row])
            stop = token in stop_ids
            halt = on_token([*new, token]) if on_token else False
            if stop:
                break
            new.append(token)
            if halt or len(new) >= max_new_tokens:
                break
            self._decode_tokens([row], len(ids) + len(new) - 1)
        return new

    def _engine_ids(self, input_ids: Sequence[int]) -> list[int]:
        """Tokenizer ids as rows of this GGUF's vocabulary (the same ids unless the vocabulary is trimmed)."""
        if self.rows is None:
            return [int(t) for t in input_ids]
        ids: list[int] = []
        for token in input_ids:
            token = int(token)
            row = int(self.rows[token]) if 0 <= token < len(self.rows) else -1
            ids.extend([row] if row >= 0 else self._spell(token))
        return ids

    def _spell(self, token: int) -> list[int]:
        """A dropped token's text as kept rows, tokenized by llama.cpp over the trimmed vocabulary."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder)
        text = self._tokenizer.convert_tokens_to_string([self._tokenizer.convert_ids_to_tokens(token)])
        raw = text.encode("utf-8")
        buffer = (self.lib.llama_token * (len(raw) + 4))()
        count = self.lib.llama_tokenize(self.vocab, raw, len(raw), buffer, len(buffer), False, False)
        if count < 0:
            raise RuntimeError(f"llama.cpp could not re-spell dropped token {token}")
        return list(buffer[:count])

    def _choose(self, logits, temperature: float) -> int:
        import numpy as np

        if temperature <= 0:
            return int(logits.argmax())
        scaled = logits.astype(np.float64) / temperature
        probs = np.exp(scaled - scaled.max())
        return int(self.rng.choice(len(probs), p=probs / probs.sum()))

    def _prefill(self, ids: list[int], vectors) -> None:
        """The prompt in pieces: token runs as ids, image runs as embeddings; logits only at the end."""
        image_rows = iter(vectors) if vectors is not None else iter(())
        start = 0
        while start < len(ids):
            is_image = ids[start] == self.image_row
            stop = start
            while stop < len(ids) and (ids[stop] == self.image_row) == is_image:
                stop += 1
            last = stop == len(ids)
            if is_image:
                rows = [next(image_rows) for _ in range(stop - start)]
                self._decode_embeddings(rows, start, last)
            else:
                self._decode_tokens(ids[start:stop], start, last)
            start = stop

    def _decode_tokens(self, tokens: list[int], first_position: int, want_logits: bool = True) -> None:
        lib = self.lib
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, token in enumerate(tokens):
                batch.token[i] = token
                self._place(batch, i, first_position + i, want_logits and i == len(tokens) - 1)
            batch.n_tokens = len(tokens)
            self._decode(batch)
        finally:
            lib.llama_batch_free(batch)

    def _decode_embeddings(self, rows, first_position: int, want_logits: bool) -> None:
        import ctypes

        import numpy as np

        lib = self.lib
        batch = lib.llama_batch_init(len(rows), self.n_embd, 1)
        try:
            flat = np.ascontiguousarray(np.stack(rows), dtype=np.float32)
            ctypes.memmove(batch.embd, flat.ctypes.data, flat.nbytes)
            for i in range(len(rows)):
                self._place(batch, i, first_position + i, want_logits and i == len(rows) - 1)
            batch.n_tokens = len(rows)
            self._decode(batch)
        finally:
            lib.llama_batch_free(batch)

    @staticmethod
    def _place(batch, i: int, position: int, logits: bool) -> None:
        batch.pos[i] = position
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = logits

    def _decode(self, batch) -> None:
        code = self.lib.llama_decode(self.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama.cpp decode failed (code {code})")

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        if not sys.is_finalizing():  # at interpreter exit the bindings may be gone; the OS frees the memory
            self.close()


def load_edge(folder: str | Path, n_threads: int | None = None):
    """A LoadedModel (engine "llama.cpp") for an edge folder written by `tinymed export gguf`."""
    from tinymed.models.loading import LoadedModel, load_processor

    model = LlamaCppModel(folder, n_threads=n_threads)
    return LoadedModel(model=model, processor=load_processor(folder), device="cpu", name=Path(folder).name,
                       quant=model.quant, engine="llama.cpp")
