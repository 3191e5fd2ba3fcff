"""CLI: `tinymed quantize` (a quantized, reloadable copy of a checkpoint) and `tinymed profile`
(static / dynamic memory and speed, written to profile.json)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from tinymed.cli.options import cpu_linear_option


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f} MiB"


def _fail(exc: Exception) -> None:
    Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
    raise typer.Exit(1) from None


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("quantize")
    def quantize(
        model: str = typer.Option(..., "--model", help="Full-precision checkpoint folder or Hub id."),
        method: str = typer.Option(
            ...,
            "--method",
            help="torch-int8 (CPU); bnb-int8, bnb-nf4 (CUDA, CPU); quanto-int8, quanto-int4, quanto-int4-mixed, torchao-int8 "
            "(CUDA, CPU; pip install 'tinymed[extra-backends]').",
        ),
        out: Path | None = typer.Option(None, "--out", help="Output folder (default: MODEL-METHOD beside the model)."),
        projector: bool = typer.Option(False, "--projector/--no-projector", help="Also quantize the projector."),
        vision: bool = typer.Option(False, "--vision/--no-vision", help="Also quantize the vision tower."),
        lm_head: bool = typer.Option(False, "--lm-head/--no-lm-head", help="Also quantize lm_head."),
        embeddings: bool = typer.Option(
            False, "--embeddings/--no-embeddings", help="Also quantize the LLM's token embedding (torch-int8 only)."
        ),
        llm: bool = typer.Option(True, "--llm/--no-llm", help="Quantize the LLM's linear layers (default)."),
        compute_dtype: str = typer.Option("auto", "--compute-dtype", help="auto, float32, float16 or bfloat16."),
        device: str = typer.Option("auto", "--device", help="Where to quantize: cpu, cuda or auto."),
    ) -> None:
        """Quantize a checkpoint into a folder that evaluate, profile and serve load directly."""
        from tinymed.quantize import QuantConfig, quantize_model

        out = out or Path(f"{model.rstrip('/')}-{method}")
        try:
            config = QuantConfig(
                method=method, compute_dtype=compute_dtype,
                targets={"llm": llm, "projector": projector, "vision": vision, "lm_head": lm_head,
                         "embeddings": embeddings},
            )
            result = quantize_model(model, config, out, device=device)
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
            _fail(exc)
        table = Table(title=f"{method}: {len(result.quantized_modules)} layers quantized")
        for col in ("", "float32", "quantized", "ratio"):
            table.add_column(col, justify="right")
        table.add_row("quantized layers", _mib(result.quantized_layer_bytes_fp32), _mib(result.quantized_layer_bytes_after),
                      f"{result.quantized_layer_ratio:.1%}")
        table.add_row("whole model", _mib(result.static_bytes_before), _mib(result.static_bytes_after),
                      f"{result.static_bytes_after / result.static_bytes_before:.1%}")
        Console().print(table)
        Console().print(f"wrote {out} (recipe: {out / 'tinymed_quant.json'})", highlight=False)

    @app.command("profile")
    def profile(
        model: str = typer.Option(..., "--model", help="Checkpoint folder (plain or quantized) or Hub id."),
        quant: str | None = typer.Option(None, "--quant", help="Quantize a plain checkpoint on load with this method."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
        cpu_linear: str = cpu_linear_option("aten"),
        out: Path | None = typer.Option(None, "--out", help="Folder for profile.json."),
        questions: Path | None = typer.Option(None, "--questions", help="Conversation-format file (default: built-in set of 8)."),
        batch_size: int = typer.Option(8, "--batch-size", min=1, help="Evaluation batch size (second speed figure)."),
        max_new_tokens: int = typer.Option(16, "--max-new-tokens", min=2),
        runs: int = typer.Option(3, "--runs", min=1, help="Timed runs (median) after one warm-up."),
    ) -> None:
        """Measure static and peak memory, time to first token, decode speed and latency."""
        from tinymed.data import DataError
        from tinymed.evaluate.memory import ProfileConfig, profile_model

        config = ProfileConfig(model=model, quant=quant, device=device, linear_kernel=cpu_linear, out_dir=out, questions=questions,
                               batch_size=batch_size, max_new_tokens=max_new_tokens, runs=runs)
        try:
            with Console(stderr=True).status(f"profiling {model}"):
                result = profile_model(config)
        except (DataError, ValueError, FileNotFoundError, RuntimeError) as exc:
            _fail(exc)
        table = Table(title=f"{model} · {result.quant} · {result.device} ({result.dtype}, linear {result.linear_kernel})")
        for col in ("batch", "TTFT ms", "decode tok/s", "latency ms"):
            table.add_column(col, justify="right")
        for fig in result.speed.values():
            table.add_row(str(fig.batch_size), f"{fig.ttft_ms:.1f}", f"{fig.decode_tokens_per_s:.1f}", f"{fig.latency_ms:.1f}")
        console = Console()
        console.print(table)
        peak = result.dynamic.peak_bytes if result.dynamic else None
        console.print(f"static {_mib(result.static.bytes)} (disk {_mib(result.static.disk_bytes)}), peak {_mib(peak)}",
                      highlight=False)
        if out:
            console.print(f"wrote {out / 'profile.json'}", highlight=False)
