"""CLI: `tinymed demo` — the whole paper in one offline command (synthetic data by default) — and
`tinymed benchmark` — the same tables for a model you already have."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

_HEADLINE = (  # (header, section, key)
    ("open recall (LLaVA-Med)", "llava_med", "open_recall"),
    ("closed acc (LLaVA-Med)", "llava_med", "closed_accuracy"),
    ("open EM (strict)", "strict", "open_exact_match"),
    ("closed yes/no (strict)", "strict", "closed_yes_no_accuracy"),
)


def _cell(value) -> str:
    return "—" if value is None else f"{value:.1f}"


def summary_table(summary: dict, title: str = "tinymed demo") -> Table:
    """Model vs question-only baseline, overall and per question type (percentages)."""
    table = Table(title=f"{title} — fine-tuned model vs question-only baseline (%)")
    table.add_column("group")
    table.add_column("n", justify="right")
    for header, _, _ in _HEADLINE:
        table.add_column(f"model\n{header}", justify="right")
    table.add_column("baseline\nclosed acc", justify="right")
    table.add_column("baseline\nopen recall", justify="right")
    model, baseline = summary["model"], summary["baseline"]
    groups = [("all", model, baseline)] + [
        (f"{qt}", m, baseline["by"].get("question_type", {}).get(qt))
        for qt, m in sorted(model["by"].get("question_type", {}).items())
    ]
    for label, m, b in groups:
        b = b or {"llava_med": {"closed_accuracy": None, "open_recall": None}}
        table.add_row(
            label, str(m["n"]), *(_cell(m[s][k]) for _, s, k in _HEADLINE),
            _cell(b["llava_med"]["closed_accuracy"]), _cell(b["llava_med"]["open_recall"]),
        )
    return table


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("demo")
    def demo(
        out: Path = typer.Option(Path("tinymed-demo"), "--out", help="Folder that keeps every stage's outputs."),
        dataset: list[str] = typer.Option([], "--dataset", help="Real dataset name (repeatable; pairs with --path)."),
        path: list[str] = typer.Option([], "--path", help="Its folder (repeatable, same order as --dataset)."),
        eval_limit: int | None = typer.Option(None, "--eval-limit", min=1, help="Evaluate only N test questions per dataset."),
        no_profile: bool = typer.Option(False, "--no-profile", help="Skip the memory/speed profile."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    ) -> None:
        """Synthetic data → tiny LLaVA → fine-tune → FP/8-bit/4-bit → evaluate → profile → Pareto report."""
        from tinymed.cli.progress import counting_progress
        from tinymed.pipeline import DemoConfig, run_demo
        from tinymed.train import DatasetSpec

        if dataset and len(path) not in (0, len(dataset)):
            raise typer.BadParameter("give one --path per --dataset (or none, for Hub names)")
        specs = [DatasetSpec(name=d, path=p) for d, p in zip(dataset, path or [None] * len(dataset))]
        console = Console()
        config = DemoConfig(out_dir=out, datasets=specs, eval_limit=eval_limit, device=device, profile=not no_profile)
        summary = run_demo(config, progress=counting_progress, say=lambda m: console.rule(f"[bold]{m}"))
        _print_summary(console, summary, "tinymed demo")

    @app.command("benchmark")
    def benchmark(
        model: str = typer.Option(..., "--model", help="Trained model: folder, Hub id or zoo name (tinymed-med-270m)."),
        out: Path = typer.Option(..., "--out", help="Folder for variants/, baseline/, report/, summary.json."),
        dataset: list[str] = typer.Option(..., "--dataset", help="Dataset name (repeatable; pairs with --path)."),
        path: list[str] = typer.Option([], "--path", help="Its folder (repeatable, same order as --dataset)."),
        split: list[str] = typer.Option([], "--split", help="Split scored, one per --dataset (default test); a carved "
                                        "part (train:val10) gives the baseline its other part (train:rest10)."),
        quant: list[str] = typer.Option([], "--quant", help="Quantization method, or method:compute_dtype such as "
                                        "quanto-int4-mixed:bfloat16 (repeatable; default: best measured 8/4-bit)."),
        gguf: list[str] = typer.Option([], "--gguf", help="Also a llama.cpp export as variant llamacpp-<quant>: f16, "
                                       "q8_0, q4_k_m or q4_0 (repeatable; needs tinymed[edge], which ./setup.sh installs)."),
        tokenizer_gguf: str | None = typer.Option(
            None, "--tokenizer-gguf", help="With --gguf and a checkpoint whose tokenizer has no tokenizer.model: the "
            "GGUF its LM came from."),
        image_control: list[str] = typer.Option([], "--image-control", help="shuffled and/or blank, on fp32."),
        eval_limit: int | None = typer.Option(None, "--eval-limit", min=1, help="Evaluate only N questions per dataset."),
        max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=1),
        no_profile: bool = typer.Option(False, "--no-profile", help="Skip the memory/speed profile."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
    ) -> None:
        """A trained model → FP/8-bit/4-bit (+ llama.cpp exports) → evaluate (+ image controls, question-only baseline) →
        profile → Pareto report: the paper's tables for your model and data. Resumes evaluations."""
        from pydantic import ValidationError

        from tinymed.cli.progress import counting_progress
        from tinymed.data.registry import DatasetSpec as EvalSpec
        from tinymed.pipeline import BenchmarkConfig, run_benchmark

        if len(path) not in (0, len(dataset)):
            raise typer.BadParameter("give one --path per --dataset (or none, for Hub names)")
        if len(split) not in (0, len(dataset)):
            raise typer.BadParameter("give one --split per --dataset (or none: every dataset's test split)")
        splits = split or ["test"] * len(dataset)
        try:
            config = BenchmarkConfig(
                model=model, out_dir=out, quant_methods=quant or None, gguf_quants=gguf, tokenizer_gguf=tokenizer_gguf,
                image_controls=image_control,
                datasets=[EvalSpec(name=d, path=p, split=s)
                          for d, p, s in zip(dataset, path or [None] * len(dataset), splits)],
                eval_limit=eval_limit, max_new_tokens=max_new_tokens, device=device, profile=not no_profile,
            )
        except ValidationError as exc:
            raise typer.BadParameter(str(exc)) from None
        console = Console()
        summary = run_benchmark(config, progress=counting_progress, say=lambda m: console.rule(f"[bold]{m}"))
        _print_summary(console, summary, f"tinymed benchmark {model}")


def _print_summary(console: Console, summary: dict, title: str) -> None:
    console.print(summary_table(summary, title))
    gain = summary["model"]["llava_med"]["closed_accuracy"] - summary["baseline"]["llava_med"]["closed_accuracy"]
    console.print(
        f"closed accuracy: model beats the question-only baseline by {gain:+.1f} points; "
        f"Pareto front: {', '.join(summary['pareto_front'])}; report: {summary['report']}; "
        f"{summary['seconds']:.0f} s in all", highlight=False,
    )
