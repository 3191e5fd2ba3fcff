"""CLI: `tinymed evaluate` — batched evaluation of a model (or an endpoint) on a dataset."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tinymed.cli.options import cpu_linear_option
from tinymed.evaluate.image_controls import ImageControl


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("evaluate")
    def evaluate(
        out: Path = typer.Option(..., "--out", help="Folder for predictions.jsonl, metrics.json, eval_config.json."),
        model: str | None = typer.Option(None, "--model", help="Checkpoint folder or Hub id."),
        quant: str | None = typer.Option(None, "--quant", help="Quantize on load with this method (see `tinymed quantize --help`)."),
        endpoint: str | None = typer.Option(None, "--endpoint", help="OpenAI-compatible base URL instead of a local model, e.g. http://127.0.0.1:8000/v1."),
        model_name: str | None = typer.Option(None, "--model-name", help="Model name at the endpoint (default: its first model)."),
        api_key: str | None = typer.Option(None, "--api-key", envvar="TINYMED_API_KEY", help="API key for the endpoint."),
        dataset: str = typer.Option("synthetic", "--dataset", help="vqa-rad, slake, pathvqa, llava-med or synthetic."),
        path: str | None = typer.Option(None, "--path", help="Dataset folder or file (default: Hub name / embedded synthetic set)."),
        split: str = typer.Option("test", "--split"),
        language: str = typer.Option("en", "--language", help="SLAKE language filter: en, zh or all."),
        batch_size: int = typer.Option(8, "--batch-size", min=1),
        max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
        limit: int | None = typer.Option(None, "--limit", min=1, help="Only the first N questions (quick look)."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
        cpu_linear: str = cpu_linear_option("aten"),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed dataset rows (counted)."),
        fresh: bool = typer.Option(False, "--fresh", help="Ignore predictions an interrupted run left in --out."),
        image_control: ImageControl = typer.Option(
            "none", "--image-control", help="Show each question its own image (none), another case's (shuffled: a "
            "seeded derangement of the distinct images) or a uniform grey one of the same size (blank)."),
        control_seed: int = typer.Option(0, "--control-seed", help="Seed of the shuffled control's permutation."),
    ) -> None:
        """Answer a dataset's questions with a model; write predictions and LLaVA-Med + strict metrics."""
        from tinymed.cli.progress import counting_progress
        from tinymed.cli.score import metrics_table
        from tinymed.data import DataError
        from tinymed.evaluate.runner import EvalConfig
        from tinymed.evaluate.runner import evaluate as run_evaluation

        config = EvalConfig(
            model=model, quant=quant, endpoint=endpoint, model_name=model_name, api_key=api_key, dataset=dataset,
            path=path, split=split, language=language, out_dir=out, batch_size=batch_size,
            max_new_tokens=max_new_tokens, limit=limit, device=device, linear_kernel=cpu_linear, skip_invalid=skip_invalid, resume=not fresh,
            image_control=image_control, control_seed=control_seed,
        )
        err = Console(stderr=True)
        try:
            with counting_progress(f"evaluate {dataset}/{split}") as update:
                result = run_evaluation(config, on_progress=update)
        except (DataError, ValueError, FileNotFoundError, RuntimeError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        console = Console()
        shown = "" if image_control == "none" else f", image control: {image_control}"
        title = f"{dataset}/{split}: {result.n} questions, {result.errors} errors{shown}"
        console.print(metrics_table(result.metrics, title))
        console.print(f"wrote {out / 'predictions.jsonl'} and {out / 'metrics.json'} ({result.seconds:.1f} s)", highlight=False)
