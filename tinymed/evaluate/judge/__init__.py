"""LLM-as-judge evaluation following LLaVA-Med's GPT-4 review protocol, with any OpenAI-compatible judge."""

from tinymed.evaluate.judge.answers import AnswerSource, EndpointAnswers, PredictionsFile
from tinymed.evaluate.judge.client import ChatClient, ClientStats, EndpointConfig, RequestFailed, ResponseCache, Usage
from tinymed.evaluate.judge.protocol import JudgeItem, parse_scores, reference_messages, review_messages
from tinymed.evaluate.judge.questions import domain_of, load_judge_items, read_llava_med_questions
from tinymed.evaluate.judge.runner import JudgeConfig, JudgeResult, Review, review_all, run_judge
from tinymed.evaluate.judge.summary import GroupScore, JudgeSummary, group_label, summarize_scores

__all__ = [
    "AnswerSource",
    "ChatClient",
    "ClientStats",
    "EndpointAnswers",
    "EndpointConfig",
    "GroupScore",
    "JudgeConfig",
    "JudgeItem",
    "JudgeResult",
    "JudgeSummary",
    "PredictionsFile",
    "RequestFailed",
    "ResponseCache",
    "Review",
    "Usage",
    "domain_of",
    "group_label",
    "load_judge_items",
    "parse_scores",
    "read_llava_med_questions",
    "reference_messages",
    "review_all",
    "review_messages",
    "run_judge",
    "summarize_scores",
]
