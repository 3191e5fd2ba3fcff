"""CLI command: judge (LLaVA-Med GPT-4 review protocol with any OpenAI-compatible judge)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def summary_table(summary) -> Table:
    """The poster's table: one row for the model, one column per group (relative score, n)."""
    from tinymed.evaluate.judge import group_label

    table = Table(title=f"LLaVA-Med GPT-4 protocol (judge: {summary.judge_model}), relative score %")
    table.add_column("Model")
    for group in summary.groups:
        table.add_column(group_label(group), justify="right")
    groups = summary.groups.values()
    table.add_row(summary.model_name, *[_fmt(g.relative_score) for g in groups])
    table.add_row("[dim]n (failed)", *[f"[dim]{g.n}" + (f" ({g.failures})" if g.failures else "") for g in groups])
    table.add_row("[dim]model/ref mean", *[f"[dim]{_fmt(g.model_mean)}/{_fmt(g.reference_mean)}" for g in groups])
    table.add_row("[dim]ratio of means", *[f"[dim]{_fmt(g.ratio_of_means)}" for g in groups])
    return table


def _run_with_progress(run_judge, config):
    columns = (TextColumn("judging"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("judge", total=None)
        return run_judge(
            config,
            on_items=lambda n: progress.update(task, total=n),
            on_review=lambda _review: progress.advance(task),
        )


def judge(
    questions: Annotated[str, typer.Option(help="LLaVA-Med question file, dataset path, or dataset name")],
    out: Annotated[Path, typer.Option(help="output folder (reviews.jsonl, judge_summary.json, cache)")],
    judge_url: Annotated[str, typer.Option(envvar="TINYMED_JUDGE_URL", help="judge base URL, e.g. https://api.openai.com/v1")],
    judge_model: Annotated[str, typer.Option(envvar="TINYMED_JUDGE_MODEL", help="judge model name")],
    judge_api_key: Annotated[Optional[str], typer.Option(envvar=["TINYMED_JUDGE_API_KEY", "OPENAI_API_KEY"], show_envvar=True, help="judge API key")] = None,
    answers: Annotated[Optional[Path], typer.Option(help="predictions.jsonl (id/question_id + prediction/text)")] = None,
    answer_url: Annotated[Optional[str], typer.Option(help="generate answers at this OpenAI-compatible URL instead")] = None,
    answer_model: Annotated[Optional[str], typer.Option(help="model name at --answer-url")] = None,
    answer_api_key: Annotated[Optional[str], typer.Option(envvar="TINYMED_ANSWER_API_KEY", help="API key for --answer-url")] = None,
    answer_model_dir: Annotated[Optional[str], typer.Option(help="generate answers with this local tinymed model (folder or Hub id)")] = None,
    answer_quant: Annotated[Optional[str], typer.Option(help="quantize --answer-model-dir on load with this method")] = None,
    answer_max_tokens: Annotated[int, typer.Option(help="max new tokens per generated answer")] = 512,
    dataset: Annotated[Optional[str], typer.Option(help="dataset loader name when --questions is a dataset path")] = None,
    split: Annotated[str, typer.Option(help="dataset split")] = "test",
    image_root: Annotated[Optional[Path], typer.Option(help="image folder of a LLaVA-Med question file")] = None,
    reference: Annotated[str, typer.Option(help="auto | gpt4_answer | generate | ground_truth")] = "auto",
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 8,
    timeout: Annotated[float, typer.Option(help="seconds per request")] = 120.0,
    max_attempts: Annotated[int, typer.Option(help="tries per request (429/5xx/timeouts are retried)")] = 5,
    backoff_base: Annotated[float, typer.Option(help="seconds; retry n waits up to base*2^n (or Retry-After)")] = 1.0,
    limit: Annotated[Optional[int], typer.Option(help="judge only the first N items")] = None,
    cache: Annotated[Optional[Path], typer.Option(help="reply cache (default OUT/judge_cache.jsonl)")] = None,
    price_in: Annotated[Optional[float], typer.Option(help="USD per 1M prompt tokens")] = None,
    price_out: Annotated[Optional[float], typer.Option(help="USD per 1M completion tokens")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="row label of the reviewed model")] = None,
) -> None:
    """Rate free-form answers with an LLM judge (LLaVA-Med protocol) and print the relative scores."""
    from pydantic import ValidationError

    from tinymed.data import DataError
    from tinymed.evaluate.judge import EndpointConfig, JudgeConfig, run_judge
    from tinymed.evaluate.judge.answers import LocalModelConfig

    if sum(x is not None for x in (answers, answer_url, answer_model_dir)) != 1:
        raise typer.BadParameter("give exactly one of --answers, --answer-url or --answer-model-dir")
    if answer_url and not answer_model:
        raise typer.BadParameter("--answer-url needs --answer-model")
    policy = dict(concurrency=concurrency, timeout_s=timeout, max_attempts=max_attempts, backoff_base_s=backoff_base)
    try:
        answer_endpoint = answer_url and EndpointConfig(
            base_url=answer_url, model=answer_model, api_key=answer_api_key, max_tokens=answer_max_tokens, **policy
        )
        config = JudgeConfig(
            questions=questions, out=str(out), dataset=dataset, split=split, reference=reference, limit=limit,
            image_root=str(image_root) if image_root else None, answers=str(answers) if answers else None,
            answer_endpoint=answer_endpoint or None,
            answer_model=LocalModelConfig(model=answer_model_dir, quant=answer_quant, max_new_tokens=answer_max_tokens)
            if answer_model_dir else None, cache=str(cache) if cache else None,
            price_in=price_in, price_out=price_out, model_name=model_name,
            judge=EndpointConfig(base_url=judge_url, model=judge_model, api_key=judge_api_key, **policy),
        )
        result = _run_with_progress(run_judge, config)
    except (DataError, ValidationError, ValueError, OSError) as exc:
        console.print(f"[red]judge: {exc}")
        raise typer.Exit(1) from exc
    summary = result.summary
    console.print(summary_table(summary))
    cost = f", cost ${summary.cost_usd:.4f}" if summary.cost_usd is not None else ""
    console.print(
        f"failures {summary.failures}, requests {summary.requests} (retries {summary.retries}), "
        f"cached {summary.cached}, tokens {summary.usage.total_tokens}{cost}"
    )
    console.print(f"wrote {result.reviews_path} and {result.summary_path}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
    app.command("judge")(judge)
