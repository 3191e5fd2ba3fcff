"""Per-group judge scores, as LLaVA-Med's summarizers compute them.

relative_score = mean over items of (model / reference) x 100: microsoft/LLaVA-Med
``llava/eval/summarize_gpt_review.py`` (the current one). ratio_of_means = mean(model) /
mean(reference) x 100: the LLaVA summarizer (haotian-liu/LLaVA ``llava/eval/summarize_gpt_review.py``)
that LLaVA-Med's first release reported. Items whose reference score is 0 are left out of the mean of
ratios (counted in `relative_n`); LLaVA-Med would divide by zero.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from tinymed.evaluate.judge.client import Usage
from tinymed.evaluate.judge.questions import DOMAIN_ORDER, TYPE_ORDER

OVERALL = "overall"
# LLaVA-Med's column order and the poster's column labels.
GROUP_LABELS = {
    "conversation": "Conv.",
    "detailed_description": "Desc.",
    "chest_xray": "X-Ray",
    "mri": "MRI",
    "histology": "Histology",
    "gross": "Gross",
    "ct_scan": "CT",
    OVERALL: "Overall",
}
KNOWN_ORDER = (*TYPE_ORDER, *DOMAIN_ORDER)


class GroupScore(BaseModel):
    """Scores of one group; means on the judge's 1-10 scale, relative scores in percent."""

    n: int = Field(description="items with parsed scores")
    failures: int = Field(description="items in the group with no scores")
    reference_mean: float | None
    model_mean: float | None
    relative_score: float | None = Field(description="mean of model/reference x 100 (LLaVA-Med)")
    relative_n: int = Field(description="items in relative_score (reference score > 0)")
    ratio_of_means: float | None = Field(description="mean(model)/mean(reference) x 100 (LLaVA)")


class JudgeSummary(BaseModel):
    """judge_summary.json: per-group scores, failures, requests, cache hits, usage and cost."""

    groups: dict[str, GroupScore]
    failures: int
    reference_sources: dict[str, int] = Field(default_factory=dict, description="items per reference source")
    requests: int = 0
    retries: int = 0
    cached: int = 0
    usage: Usage = Field(default_factory=Usage, description="tokens of requests sent in this run")
    usage_cached: Usage = Field(default_factory=Usage, description="tokens of replies reused from cache")
    cost_usd: float | None = Field(default=None, description="for `usage`, when prices were given")
    judge_model: str | None = None
    model_name: str | None = None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def group_score(pairs: list[tuple[float, float]], failures: int = 0) -> GroupScore:
    """Scores of one group from (reference, model) pairs."""
    reference_mean = _mean([r for r, _ in pairs])
    model_mean = _mean([m for _, m in pairs])
    ratios = [m / r * 100 for r, m in pairs if r > 0]
    return GroupScore(
        n=len(pairs),
        failures=failures,
        reference_mean=reference_mean,
        model_mean=model_mean,
        relative_score=_mean(ratios),
        relative_n=len(ratios),
        ratio_of_means=model_mean / reference_mean * 100 if reference_mean else None,
    )


def ordered_groups(names: Iterable[str]) -> list[str]:
    """LLaVA-Med's groups in its order, then other groups alphabetically, then overall."""
    names = set(names) - {OVERALL}
    known = [g for g in KNOWN_ORDER if g in names]
    return [*known, *sorted(names - set(known)), OVERALL]


def summarize_scores(rows: Iterable[tuple[list[str], tuple[float, float] | None]]) -> dict[str, GroupScore]:
    """Group scores from (groups, scores-or-None) per item; every item also counts in overall."""
    pairs: dict[str, list[tuple[float, float]]] = {}
    failures: dict[str, int] = {}
    for groups, scores in rows:
        for group in [*groups, OVERALL]:
            pairs.setdefault(group, [])
            failures.setdefault(group, 0)
            if scores is None:
                failures[group] += 1
            else:
                pairs[group].append(scores)
    return {g: group_score(pairs.get(g, []), failures.get(g, 0)) for g in ordered_groups(pairs)}


def cost_usd(usage: Usage, price_in: float | None, price_out: float | None) -> float | None:
    """Cost of `usage` at prices in USD per 1M prompt / completion tokens (None without prices)."""
    if price_in is None and price_out is None:
        return None
    return (usage.prompt_tokens * (price_in or 0.0) + usage.completion_tokens * (price_out or 0.0)) / 1e6


def group_label(group: str) -> str:
    """The poster's column label for a group (the group name itself for dataset modalities)."""
    return GROUP_LABELS.get(group, group)
