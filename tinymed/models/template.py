"""The one prompt template: stored in the checkpoint's processor, used by training, evaluation, serving.

The published TinyLLaVA-Med code trains with one conversation template and evaluates with another;
here every stage builds its prompt through `build_prompt`, which renders the processor's own chat
template, so the prompt a model was trained on is by construction the prompt it is asked with.
"""

from __future__ import annotations

# A LLaVA-1.5-style template, "USER: <image>\n{question} ASSISTANT: {answer}</s>" (a system message, if
# given, is prepended verbatim; tinymed sends none: on a small model it would only cost tokens).
# `IMAGE_SLOT` stands for the model's image token (`<image>` for tokenizers trained here; a pretrained
# LM's own token, e.g. Gemma's `<start_of_image>`, so its vocabulary needs no new row).
IMAGE_SLOT = "@@IMAGE@@"
_IMAGES = "{% for part in message['content'] %}{% if part['type'] == 'image' %}@@IMAGE@@\n{% endif %}{% endfor %}"
_TEXTS = "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }} "
    "{% elif message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}@@USER_PARTS@@"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{ eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def chat_template(image_token: str = "<image>", image_last: bool = False) -> str:
    """The tinymed chat template for a tokenizer whose image-position token is `image_token`: the user's
    image before the question (LLaVA's order), or after it with `image_last`
    ("USER: {question}<image>\n ASSISTANT:"), so that a causal LM reads the image already knowing the question."""
    parts = _TEXTS + _IMAGES if image_last else _IMAGES + _TEXTS
    return _TEMPLATE.replace("@@USER_PARTS@@", parts).replace(IMAGE_SLOT, image_token)


def user_message(question: str) -> dict:
    """The chat message for one image + one question (image part first, as LLaVA was trained)."""
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question.strip()}]}


def build_prompt(processor, question: str) -> str:
    """Render the processor's chat template for one image and one question, ending where the answer starts."""
    return processor.apply_chat_template([user_message(question)], add_generation_prompt=True, tokenize=False)

