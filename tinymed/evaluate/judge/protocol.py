"""The LLaVA-Med GPT-4 review protocol: the judge prompt, the reference-answer prompt, score parsing.

Source: microsoft/LLaVA-Med, ``llava/eval/eval_multimodal_chat_gpt_score.py`` (``INSTRUCT_PROMPT``,
``ROLE``, ``conv_to_str``, ``compare_messages_gen``; temperature 0 in ``llava/eval/llm.py``). The
strings below are reproduced verbatim, including the stray leading apostrophe of the system message
and the two-space indentation of the instruction's continuation lines, so that scores are comparable
with the published ones. The question is the file's ``text`` as given (LLaVA-Med v1.5 keeps the
trailing ``\\n<image>``), and the figure context is the ``in_text_mention`` list interpolated as
Python writes it, exactly as that script does.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, Field

JUDGE_SYSTEM_MESSAGE = "'You are a helpful and precise assistant for checking the quality of the answer."
ROLE = "Assistant"
JUDGE_INSTRUCTION = (
    "We would like to request your feedback on the performance of two AI assistants in response to "
    "the user question displayed above. The user asks the question on observing an image. For your "
    "reference, the visual content in the image is represented with caption describing the same image.\n"
    "  Please rate the helpfulness, relevance, accuracy, level of details of their responses. Each "
    "assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better "
    "overall performance.\n"
    "  Please first output a single line containing only two values indicating the scores for "
    "Assistant 1 and 2, respectively. The two scores are separated by a space. In the subsequent line, "
    "please provide a comprehensive explanation of your evaluation, avoiding any potential bias and "
    "ensuring that the order in which the responses were presented does not affect your judgment."
)

# Reference answers written by the judge (LLaVA-Med's were text-only GPT-4 answers from the caption
# and mentions); this wording is tinymed's own, the system message is LLaVA-Med's answer-generation one.
REFERENCE_SYSTEM_MESSAGE = "You are a helpful assistant."
REFERENCE_INSTRUCTION = (
    "Answer the question as if you were looking at the image that the context above describes. "
    "Use only what the context states, and do not mention the caption or the context."
)

SCORE_MIN, SCORE_MAX = 0.0, 10.0


class JudgeItem(BaseModel):
    """One question to review: its context, the reference (if the source has one) and its groups.

    `fig_label`/`fig_caption`/`fig_context` follow LLaVA-Med's qa50 fields. Items from VQA datasets
    have no caption: `ground_truth` (the dataset answer) is their context instead.
    """

    id: str
    question: str
    fig_label: str | None = None
    fig_caption: str | None = None
    fig_context: str | None = None
    ground_truth: str | None = None
    gpt4_answer: str | None = None
    groups: list[str] = Field(default_factory=list, description="groups besides 'overall', e.g. type, domain")
    image: str | None = Field(default=None, description="image file path, when known")

    @property
    def has_caption(self) -> bool:
        return bool(self.fig_caption)


def render_context(item: JudgeItem) -> str:
    """The [Context] body: LLaVA-Med's caption + mentions, or the ground truth for caption-less items."""
    if item.has_caption:
        return (
            f"Figure Caption:\n{item.fig_label}: {item.fig_caption}\n\n"
            f"Figure Context:\n\t- {item.fig_context}\n\n"
        )
    return f"Ground-truth answer:\n{item.ground_truth}\n\n"


def review_messages(item: JudgeItem, reference: str, answer: str) -> list[dict]:
    """Chat messages asking the judge to score `reference` (Assistant 1) and `answer` (Assistant 2)."""
    user = (
        f"[Context]\n{render_context(item)}"
        f"[Question]\n{item.question}\n\n"
        f"[{ROLE} 1]\n{reference}\n\n[End of {ROLE} 1]\n\n"
        f"[{ROLE} 2]\n{answer}\n\n[End of {ROLE} 2]\n\n"
        f"[System]\n{JUDGE_INSTRUCTION}\n\n"
    )
    return [{"role": "system", "content": JUDGE_SYSTEM_MESSAGE}, {"role": "user", "content": user}]


def reference_messages(item: JudgeItem) -> list[dict]:
    """Chat messages asking the judge to write a text-only reference answer from the context."""
    user = f"[Context]\n{render_context(item)}[Question]\n{item.question}\n\n{REFERENCE_INSTRUCTION}"
    return [{"role": "system", "content": REFERENCE_SYSTEM_MESSAGE}, {"role": "user", "content": user}]


_N = r"(\d+(?:\.\d+)?)"
_OUT_OF_TEN = r"(?:\s*/\s*10)?"
# A line holding just the pair: "8 7", "8, 7", "Scores: 8/10 and 7/10", "**8 7**".
_PAIR_LINE = re.compile(
    rf"^(?:[A-Za-z ]{{0,20}}:)?\s*{_N}{_OUT_OF_TEN}\s*(?:,|;|\band\b|\bvs\.?|\s)\s*{_N}{_OUT_OF_TEN}\s*\.?$",
    re.IGNORECASE,
)
_LABELLED = {
    k: re.compile(rf"assistant\s*{k}\s*(?:score)?\s*[:=\-]?\s*{_N}{_OUT_OF_TEN}", re.IGNORECASE) for k in "12"
}
_SEARCHED_LINES = 3


def _in_range(pair: tuple[float, float]) -> tuple[float, float] | None:
    return pair if all(SCORE_MIN <= s <= SCORE_MAX for s in pair) else None


def parse_scores(reply: str) -> tuple[float, float] | None:
    """(reference score, model score) from a judge reply, or None when it holds no clear pair.

    LLaVA-Med splits the first line on one space. Real judges also send extra spaces, commas, "8/10",
    markdown bold, "Assistant 1: 8 / Assistant 2: 6", or a preamble line first; so the first of the
    first three non-empty lines that holds only the pair wins, else "Assistant 1: x" and
    "Assistant 2: y" labels found in those lines. Scores outside 0-10 are rejected.
    """
    lines = [line.replace("*", "").strip() for line in reply.splitlines()]
    head = [line for line in lines if line][:_SEARCHED_LINES]
    for line in head:
        match = _PAIR_LINE.match(line)
        if match:
            return _in_range((float(match[1]), float(match[2])))
    labelled = [_LABELLED[k].search(" ".join(head)) for k in "12"]
    if all(labelled):
        return _in_range((float(labelled[0][1]), float(labelled[1][1])))
    return None
