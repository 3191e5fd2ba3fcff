"""Turn one (image, question, answer) into training tensors with exactly the inference prompt."""

from __future__ import annotations

from tinymed.models.template import build_prompt

IGNORE_INDEX = -100  # label value the loss skips (prompt and image tokens)


def answer_text(answer: str) -> str:
    """The answer as training appends it to the prompt (one space, then the answer; EOS follows)."""
    return " " + answer.strip()


def encode_for_training(processor, image, question: str, answer: str) -> dict:
    """Tensors for one example: the prompt is `build_prompt(...)` (the very string inference uses),
    followed by " {answer}" and EOS; labels are IGNORE_INDEX on the prompt so loss is on answer tokens only.

    Returns 1-D `input_ids` and `labels` and a `pixel_values` tensor of shape (1, 3, H, W)."""
    import torch

    tok = processor.tokenizer
    enc = processor(text=build_prompt(processor, question), images=image, return_tensors="pt")
    prompt_ids = enc["input_ids"][0]
    answer_ids = tok(answer_text(answer), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    answer_ids = torch.tensor(answer_ids, dtype=prompt_ids.dtype)
    return {
        "input_ids": torch.cat([prompt_ids, answer_ids]),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer_ids]),
        "pixel_values": enc["pixel_values"],
    }
