"""Batched greedy generation (left padding, KV cache) — the one answer path for evaluation and serving."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tinymed.models.template import build_prompt


@dataclass
class GeneratedAnswer:
    text: str
    new_tokens: int


def prepare_inputs(lm, images: Sequence, questions: Sequence[str]) -> dict:
    """Tokenize prompts (left-padded) and preprocess images into model inputs on the model's device."""
    import torch

    prompts = [build_prompt(lm.processor, q) for q in questions]
    batch = lm.processor(text=prompts, images=list(images), padding=True, return_tensors="pt")
    model_dtype = next(lm.model.parameters()).dtype
    pixel_dtype = model_dtype if model_dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    return {
        k: (v.to(lm.device, dtype=pixel_dtype) if k == "pixel_values" else v.to(lm.device)) for k, v in batch.items()
    }


def generation_kwargs(lm, max_new_tokens: int, temperature: float = 0.0, min_new_tokens: int = 0,
                      prompt_len: int = 0) -> dict:
    """Greedy when temperature is 0, sampling otherwise; stops at the tokenizer's EOS, not before
    `min_new_tokens` new tokens (`prompt_len`: the padded prompt's length in tokens)."""
    tok = lm.processor.tokenizer
    kwargs = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": tok.eos_token_id,
        "use_cache": True,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    if min_new_tokens > 0:
        from transformers import LogitsProcessorList

        end_ids = sorted({tok.eos_token_id, tok.pad_token_id} - {None})
        kwargs["logits_processor"] = LogitsProcessorList([_NoEndBefore(prompt_len + min_new_tokens, end_ids)])
    return kwargs


class _NoEndBefore:
    """A logits processor: the end ids (EOS and padding) score -inf until the sequence is `length` tokens
    long. transformers' own `min_new_tokens` clones the whole [batch, vocabulary] scores and rebuilds an
    end-id mask at every step, even after it stops applying: ≈8 ms of a 150 ms batch-8 decode step with
    Gemma-3's 262,144-token vocabulary (measured 2026-12-03). This one writes a few scores in place, and
    only while it applies (generate hands processors a fresh float32 copy of the logits)."""

    def __init__(self, length: int, end_ids: list[int]):
        self.length, self.end_ids = length, end_ids

    def __call__(self, input_ids, scores):
        if input_ids.shape[-1] < self.length:
            scores[:, self.end_ids] = float("-inf")
        return scores


def generate_batch(lm, images: Sequence, questions: Sequence[str], max_new_tokens: int = 32) -> list[GeneratedAnswer]:
    """Greedy answers for one batch, by the engine the model was loaded into (`lm.engine`)."""
    return ENGINES[lm.engine].answer_batch(lm, images, questions, max_new_tokens)


def _transformers_batch(lm, images: Sequence, questions: Sequence[str], max_new_tokens: int) -> list[GeneratedAnswer]:
    """All images and questions go to `model.generate` together (left-padded)."""
    import torch

    inputs = prepare_inputs(lm, images, questions)
    with torch.inference_mode():
        out = lm.model.generate(**inputs, **generation_kwargs(lm, max_new_tokens))
    new = out[:, inputs["input_ids"].shape[1] :]
    eos, pad = lm.processor.tokenizer.eos_token_id, lm.processor.tokenizer.pad_token_id
    answers = []
    for row in new.tolist():
        n = next((i for i, t in enumerate(row) if t in (eos, pad)), len(row))
        text = lm.processor.tokenizer.decode(row[:n], skip_special_tokens=True).strip()
        answers.append(GeneratedAnswer(text=text, new_tokens=n))
    return answers


def encode_prompt(lm, image, question: str):
    """The processor's output for one question: prompt ids (image positions included) and pixels."""
    return lm.processor(text=[build_prompt(lm.processor, question)], images=[image], return_tensors="pt")


def _llamacpp_stream(lm, encoded, max_new_tokens: int, temperature: float = 0.0,
                     on_token: Callable[[list[int]], bool] | None = None, min_new_tokens: int = 0) -> list[int]:
    """One encoded question (`encode_prompt`: the same prompt ids and pixels as transformers) through
    llama.cpp; the new ids (end tokens excluded). `on_token` sees the ids so far after each step; True stops."""
    tok = lm.processor.tokenizer
    return lm.model.answer_ids(encoded["input_ids"][0].tolist(), encoded.get("pixel_values"), max_new_tokens,
                               {tok.eos_token_id, tok.pad_token_id}, min_new_tokens=min_new_tokens,
                               temperature=temperature, on_token=on_token)


def _llamacpp_batch(lm, images: Sequence, questions: Sequence[str], max_new_tokens: int) -> list[GeneratedAnswer]:
    """One question at a time (llama.cpp decodes one sequence here)."""
    answers = []
    for image, question in zip(images, questions):
        new = _llamacpp_stream(lm, encode_prompt(lm, image, question), max_new_tokens)
        text = lm.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
        answers.append(GeneratedAnswer(text=text, new_tokens=len(new)))
    return answers


class _TokenClock:
    """A generate() streamer that timestamps each put: the prompt first, then every generated step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, _value=None) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _transformers_timed(lm, images, questions, max_new_tokens: int) -> tuple[float, float, float]:
    import torch

    clock = _TokenClock()
    start = time.perf_counter()
    inputs = prepare_inputs(lm, images, questions)
    kwargs = generation_kwargs(lm, max_new_tokens, min_new_tokens=max_new_tokens,
                               prompt_len=inputs["input_ids"].shape[1])
    with torch.no_grad():  # not inference_mode: some quantized tensor types cannot be used under it
        lm.model.generate(**inputs, **kwargs, streamer=clock)
    latency = time.perf_counter() - start
    first, last = clock.times[1], clock.times[-1]
    decoded = (len(clock.times) - 2) * len(questions)
    return first - start, decoded / max(last - first, 1e-9), latency


def _llamacpp_timed(lm, images, questions, max_new_tokens: int) -> tuple[float, float, float]:
    """llama.cpp answers one question after another: ttft = until the first question's first token;
    decode speed = tokens after each answer's first over the time spent decoding them."""
    start = time.perf_counter()
    ttft, decoded, decoding = None, 0, 0.0
    for image, question in zip(images, questions):
        clock = _TokenClock()
        _llamacpp_stream(lm, encode_prompt(lm, image, question), max_new_tokens, on_token=lambda ids: clock.put(),
                         min_new_tokens=max_new_tokens)
        ttft = clock.times[0] - start if ttft is None else ttft
        decoded += len(clock.times) - 1
        decoding += clock.times[-1] - clock.times[0]
    return ttft, decoded / max(decoding, 1e-9), time.perf_counter() - start


@dataclass(frozen=True)
class Engine:
    """How one inference engine answers a batch, and times one (ttft_s, decode_tokens_per_s, latency_s)
    generating exactly max_new_tokens per answer. `stream` (engines that decode one sequence at a time)
    answers one question encoded by `encode_prompt`, reporting each step: `serve` streams through it; without it, serve batches
    through `model.generate`."""

    answer_batch: Callable[..., list[GeneratedAnswer]]
    timed_batch: Callable[..., tuple[float, float, float]]
    stream: Callable[..., list[int]] | None = None


# The inference engines, by LoadedModel.engine.
ENGINES = {
    "transformers": Engine(_transformers_batch, _transformers_timed),
    "llama.cpp": Engine(_llamacpp_batch, _llamacpp_timed, _llamacpp_stream),
}


def timed_batch(lm, images: Sequence, questions: Sequence[str], max_new_tokens: int) -> tuple[float, float, float]:
    """(time to first token s, decode tokens/s, whole-batch latency s), exactly max_new_tokens per answer."""
    return ENGINES[lm.engine].timed_batch(lm, images, questions, max_new_tokens)


def generate_answers(
    lm, images: Sequence, questions: Sequence[str], max_new_tokens: int = 32, batch_size: int = 8
) -> list[GeneratedAnswer]:
    """Greedy answers for many (image, question) pairs, `batch_size` at a time."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    answers: list[GeneratedAnswer] = []
    for start in range(0, len(questions), batch_size):
        stop = start + batch_size
        answers += generate_batch(lm, images[start:stop], questions[start:stop], max_new_tokens)
    return answers
