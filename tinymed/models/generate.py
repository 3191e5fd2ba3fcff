"""Batched greedy generation (left padding, KV cache) — the one answer path for evaluation and serving."""

from __future__ import annotations

from collections.abc import Sequence
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


def generation_kwargs(lm, max_new_tokens: int, temperature: float = 0.0) -> dict:
    """Greedy when temperature is 0, sampling otherwise; stops at the tokenizer's EOS."""
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
    return kwargs


def generate_batch(lm, images: Sequence, questions: Sequence[str], max_new_tokens: int = 32) -> list[GeneratedAnswer]:
    """Greedy answers for one batch (all images and questions go to the model together)."""
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
