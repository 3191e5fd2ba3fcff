"""Run the LLaVA-Med GPT-4 review: answers → judge → reviews.jsonl + judge_summary.json.

Protocol: microsoft/LLaVA-Med ``llava/eval/eval_multimodal_chat_gpt_score.py`` (prompt, temperature 0,
reference = the file's ``gpt4_answer`` as Assistant 1, model answer as Assistant 2) and
``llava/eval/summarize_gpt_review.py`` (groups, relative score). An unparseable reply is asked once
more (a separate cache entry), then recorded as a failure; failed requests are failures too.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tinymed.evaluate.judge.answers import (
    AnswerSource,
    EndpointAnswers,
    LocalModelAnswers,
    LocalModelConfig,
    PredictionsFile,
)
from tinymed.evaluate.judge.client import ChatClient, EndpointConfig, RequestFailed, ResponseCache, cache_key
from tinymed.evaluate.judge.protocol import JudgeItem, parse_scores, reference_messages, review_messages
from tinymed.evaluate.judge.questions import load_judge_items
from tinymed.evaluate.judge.summary import JudgeSummary, cost_usd, summarize_scores
from tinymed.io import write_json_atomic, write_jsonl_atomic

ReferenceMode = Literal["auto", "gpt4_answer", "generate", "ground_truth"]
ReferenceSource = Literal["gpt4_answer", "generated", "ground_truth"]
PARSE_TRIES = 2  # LLaVA-Med's reply, then one re-ask


class JudgeConfig(BaseModel):
    """One judge run. `questions`: a LLaVA-Med question file, a dataset path, or a dataset name."""

    questions: str
    out: str
    judge: EndpointConfig
    answers: str | None = Field(default=None, description="predictions.jsonl with the model's answers")
    answer_endpoint: EndpointConfig | None = Field(default=None, description="generate answers here instead")
    answer_model: LocalModelConfig | None = Field(default=None, description="or with this local model")
    dataset: str | None = None
    split: str = "test"
    image_root: str | None = Field(default=None, description="folder of a question file's images")
    reference: ReferenceMode = Field(
        default="auto",
        description="auto: gpt4_answer if present, else judge-written from a caption, else the ground truth",
    )
    limit: int | None = Field(default=None, ge=1)
    cache: str | None = Field(default=None, description="default: OUT/judge_cache.jsonl")
    price_in: float | None = Field(default=None, description="USD per 1M prompt tokens")
    price_out: float | None = Field(default=None, description="USD per 1M completion tokens")
    model_name: str | None = Field(default=None, description="row label of the reviewed model")


class Review(BaseModel):
    """One line of reviews.jsonl. `scores` is None exactly when `error` says why."""

    id: str
    groups: list[str]
    question: str
    reference_source: ReferenceSource | None = None
    reference: str | None = None
    answer: str | None = None
    prompt_hash: str | None = None
    raw_reply: str | None = None
    scores: dict[str, float] | None = Field(default=None, description="{'reference': x, 'model': y}, 1-10")
    judge_calls: int = Field(default=0, description="review replies used (2 when the first was re-asked)")
    cached: bool = False
    error: str | None = None


class JudgeResult(BaseModel):
    summary: JudgeSummary
    reviews: list[Review]
    reviews_path: Path
    summary_path: Path


def reference_source(item: JudgeItem, mode: ReferenceMode) -> ReferenceSource:
    """Which reference the item gets under `mode`; ValueError when the item lacks what it needs."""
    if mode == "auto":
        if item.gpt4_answer:
            return "gpt4_answer"
        return "generated" if item.has_caption or not item.ground_truth else "ground_truth"
    source = {"gpt4_answer": "gpt4_answer", "generate": "generated", "ground_truth": "ground_truth"}[mode]
    if source == "gpt4_answer" and not item.gpt4_answer:
        raise ValueError("the item has no gpt4_answer")
    if source == "ground_truth" and not item.ground_truth:
        raise ValueError("the item has no ground-truth answer")
    if source == "generated" and not (item.has_caption or item.ground_truth):
        raise ValueError("the item has neither a caption nor a ground-truth answer to write a reference from")
    return source


async def _reference(item: JudgeItem, source: ReferenceSource, judge: ChatClient) -> str:
    if source == "gpt4_answer":
        return item.gpt4_answer
    if source == "ground_truth":
        return item.ground_truth
    return (await judge.complete(reference_messages(item))).text


async def review_item(item: JudgeItem, answer: str | None, judge: ChatClient, mode: ReferenceMode) -> Review:
    """Judge one answer against its reference; any failure is recorded in the Review, not raised."""
    review = Review(id=item.id, groups=item.groups, question=item.question, answer=answer)
    if answer is None:
        review.error = "no model answer for this id"
        return review
    try:
        review.reference_source = reference_source(item, mode)
        review.reference = await _reference(item, review.reference_source, judge)
        messages = review_messages(item, review.reference, answer)
        review.prompt_hash = cache_key(judge.config.model, messages, judge.params())
        for variant in range(PARSE_TRIES):
            reply = await judge.complete(messages, variant=variant)
            review.raw_reply, review.cached, review.judge_calls = reply.text, reply.cached, variant + 1
            scores = parse_scores(reply.text)
            if scores is not None:
                review.scores = {"reference": scores[0], "model": scores[1]}
                return review
        review.error = f"no score pair in the judge's reply ({PARSE_TRIES} replies)"
    except (RequestFailed, ValueError) as exc:
        review.error = str(exc)
    return review


async def review_all(
    items: list[JudgeItem],
    answers: dict[str, str],
    judge: ChatClient,
    mode: ReferenceMode = "auto",
    on_review: Callable[[Review], None] | None = None,
) -> list[Review]:
    """Review every item concurrently (the client bounds requests in flight); item order is kept."""

    async def one(item: JudgeItem) -> Review:
        review = await review_item(item, answers.get(item.id), judge, mode)
        if on_review:
            on_review(review)
        return review

    return list(await asyncio.gather(*(one(item) for item in items)))


def summarize_reviews(reviews: list[Review], judge: ChatClient, config: JudgeConfig) -> JudgeSummary:
    """judge_summary.json's content from the reviews and the client's counters."""
    rows = [(r.groups, (r.scores["reference"], r.scores["model"]) if r.scores else None) for r in reviews]
    stats = judge.stats
    return JudgeSummary(
        groups=summarize_scores(rows),
        failures=sum(r.scores is None for r in reviews),
        reference_sources=dict(Counter(r.reference_source for r in reviews if r.reference_source)),
        requests=stats.requests,
        retries=stats.retries,
        cached=stats.cached,
        usage=stats.usage,
        usage_cached=stats.usage_cached,
        cost_usd=cost_usd(stats.usage, config.price_in, config.price_out),
        judge_model=config.judge.model,
        model_name=config.model_name or _default_model_name(config),
    )


def _default_model_name(config: JudgeConfig) -> str:
    if config.answer_endpoint:
        return config.answer_endpoint.model
    if config.answer_model:
        return Path(config.answer_model.model).name
    if config.answers:
        return Path(config.answers).resolve().parent.name
    return "model"


def _answer_source(config: JudgeConfig, cache: ResponseCache, samples: dict) -> AnswerSource:
    if config.answers:
        return PredictionsFile(config.answers)
    if config.answer_endpoint:
        return EndpointAnswers(config.answer_endpoint, cache, samples)
    if config.answer_model:
        return LocalModelAnswers(config.answer_model, samples)
    raise ValueError("no answers: give a predictions file (answers), an answer endpoint or a local model")


def run_judge(
    config: JudgeConfig,
    answer_source: AnswerSource | None = None,
    on_review: Callable[[Review], None] | None = None,
    on_items: Callable[[int], None] | None = None,
) -> JudgeResult:
    """Load items, get answers, judge them, write reviews.jsonl and judge_summary.json (atomically)."""
    out = Path(config.out)
    items, samples = load_judge_items(config.questions, config.dataset, config.split, config.image_root)
    items = items[: config.limit] if config.limit else items
    cache = ResponseCache(config.cache or out / "judge_cache.jsonl")
    answers = (answer_source or _answer_source(config, cache, samples)).answer(items)
    if on_items:
        on_items(len(items))

    async def judge_all() -> tuple[list[Review], JudgeSummary]:
        async with ChatClient(config.judge, cache) as judge:
            reviews = await review_all(items, answers, judge, config.reference, on_review)
        return reviews, summarize_reviews(reviews, judge, config)

    reviews, summary = asyncio.run(judge_all())
    reviews_path = write_jsonl_atomic(out / "reviews.jsonl", (r.model_dump() for r in reviews))
    summary_path = write_json_atomic(out / "judge_summary.json", summary.model_dump())
    return JudgeResult(summary=summary, reviews=reviews, reviews_path=reviews_path, summary_path=summary_path)
