"""CLI: `tinymed finetune` — two-stage fine-tuning (alignment → instruction tuning), resumable.

Several GPUs: `accelerate launch --num_processes 4 -m tinymed.cli finetune --dataset vqa-rad --path
data/vqa-rad --dataset slake --path data/slake --out runs/ft` (the same command as on one device).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

SYNTHETIC = "synthetic"


def pair_datasets(datasets: list[str], paths: list[str], splits: list[str]) -> list[dict]:
    """Pair repeated --dataset/--path/--split in order. Paths: one per dataset ("-" = none), or one per
    non-synthetic dataset (synthetic then uses its default set). Splits: none (train), one, or one each."""
    if not datasets:
        raise typer.BadParameter("give at least one --dataset", param_hint="--dataset")
    needing = [d for d in datasets if d != SYNTHETIC]
    if len(paths) == len(datasets):
        resolved = [None if p == "-" else p for p in paths]
    elif len(paths) == len(needing):
        given = iter(paths)
        resolved = [None if d == SYNTHETIC else next(given) for d in datasets]
    else:
        raise typer.BadParameter(
            f"{len(paths)} --path for {len(datasets)} --dataset: give one per dataset ('-' for none) "
            "or one per non-synthetic dataset", param_hint="--path")
    if len(splits) not in (0, 1, len(datasets)):
        raise typer.BadParameter("give no --split (train), one for all, or one per --dataset", param_hint="--split")
    split_list = splits * len(datasets) if len(splits) == 1 else splits or ["train"] * len(datasets)
    return [{"name": d, "path": p, "split": s} for d, p, s in zip(datasets, resolved, split_list)]


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("finetune")
    def finetune(
        out: Path | None = typer.Option(None, "--out", help="Run folder: checkpoints, train_log.jsonl, final/."),
        dataset: list[str] = typer.Option([], "--dataset", help="vqa-rad, slake, pathvqa, llava-med or synthetic (repeatable)."),
        path: list[str] = typer.Option([], "--path", help="Its local folder/file, in --dataset order (optional for synthetic)."),
        split: list[str] = typer.Option([], "--split", help="Split per dataset (default train)."),
        model: str | None = typer.Option(None, "--model", help="Start from this LLaVA checkpoint (folder or Hub id)."),
        preset: str = typer.Option("tiny", "--preset", help="Without --model: build this preset from the training text."),
        stages: str = typer.Option("align,instruct", "--stages", help="Which stages, in order: align, instruct or both."),
        epochs: float | None = typer.Option(None, "--epochs", min=0.01, help="Epochs per stage (default: tuned per stage)."),
        max_steps: int | None = typer.Option(None, "--max-steps", min=1, help="Optimizer steps per stage (overrides --epochs)."),
        lr_align: float = typer.Option(1e-3, "--lr-align"),
        lr_instruct: float = typer.Option(1e-3, "--lr-instruct"),
        batch_size: int = typer.Option(16, "--batch-size", min=1, help="Samples per batch per process."),
        grad_accum: int = typer.Option(1, "--grad-accum", min=1, help="Batches per optimizer step."),
        lora: bool = typer.Option(False, "--lora/--full", help="Stage 2: LoRA on the LM, or full fine-tuning."),
        save_every: int = typer.Option(50, "--save-every", min=1, help="Checkpoint every N optimizer steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out."),
        limit: int | None = typer.Option(None, "--limit", min=1, help="At most N samples per dataset."),
        skip_invalid: bool = typer.Option(False, "--skip-invalid", help="Skip malformed dataset rows (counted)."),
        keep_adapter: bool = typer.Option(False, "--keep-adapter", help="Save the LoRA adapter instead of merging it."),
        config_file: Path | None = typer.Option(None, "--config", exists=True, dir_okay=False,
                                                help="A FinetuneConfig JSON (then only --out and --resume apply)."),
    ) -> None:
        """Fine-tune a LLaVA model: stage 1 trains the projector, stage 2 the projector + LM."""
        from pydantic import ValidationError

        from tinymed.data import DataError
        from tinymed.train import FinetuneConfig, default_stages, finetune as run_finetune

        err = Console(stderr=True)
        try:
            if config_file:
                raw = json.loads(config_file.read_text(encoding="utf-8"))
                config = FinetuneConfig.model_validate({**raw, "out_dir": out} if out else raw)
            else:
                if out is None:
                    raise typer.BadParameter("--out is required (or --config)", param_hint="--out")
                wanted = [s.strip() for s in stages.split(",") if s.strip()]
                if not wanted or set(wanted) - {"align", "instruct"}:
                    raise typer.BadParameter(f"{stages!r}: use align, instruct or align,instruct", param_hint="--stages")
                chosen = [s for s in default_stages(epochs, max_steps, lr_align, lr_instruct, batch_size, grad_accum, lora)
                          if s.name in wanted]
                config = FinetuneConfig(
                    datasets=pair_datasets(dataset, path, split), model=model, preset=preset, stages=chosen,
                    out_dir=out, save_every=save_every, limit=limit, skip_invalid=skip_invalid,
                    keep_adapter=keep_adapter,
                )
            result = run_finetune(config, resume=resume)
        except (ValidationError, DataError, FileNotFoundError, ValueError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        Console().print(
            f"steps {result.steps}, final loss {result.final_loss:.4f}, {result.skipped} samples skipped, "
            f"{result.seconds:.0f} s; model: {result.model_dir}; log: {result.log_path}", highlight=False,
        )
