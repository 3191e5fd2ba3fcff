"""CLI: `tinymed serve` — the web page and the OpenAI-compatible API for one model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from tinymed.cli.options import cpu_linear_option
from tinymed.serve.batching import BatchConfig  # light: pydantic and the standard library only

_BATCH = BatchConfig()  # the defaults the options below show


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""

    @app.command("serve")
    def serve(
        model: str = typer.Option(..., "--model", help="Checkpoint folder (plain or quantized) or Hub id."),
        quant: str | None = typer.Option(None, "--quant", help="Quantize on load with this method (see `tinymed quantize --help`)."),
        device: str = typer.Option("auto", "--device", help="cpu, cuda or auto."),
        cpu_linear: str = cpu_linear_option("auto"),
        host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs an API key."),
        port: int = typer.Option(8000, "--port", min=1, max=65535),
        api_key: str | None = typer.Option(None, "--api-key", envvar="TINYMED_API_KEY", help="Required as `Authorization: Bearer` on API calls."),
        model_name: str | None = typer.Option(None, "--model-name", help="Name clients ask for (default: the model folder's name)."),
        max_batch: int = typer.Option(_BATCH.max_batch, "--max-batch", min=1, help="Requests generated together at most (1: batching off)."),
        batch_wait_ms: float = typer.Option(_BATCH.batch_wait_ms, "--batch-wait-ms", min=0, help="Longest a request waits for companions, ms (at most 5% of recent batches' run time)."),
        max_queue: int = typer.Option(_BATCH.max_queue, "--max-queue", min=1, help="Waiting requests at most; more get 503 + Retry-After."),
        max_tokens: int = typer.Option(512, "--max-tokens", min=1, help="Largest max_tokens a request may ask for."),
        timeout: float = typer.Option(120.0, "--timeout", min=1, help="Per-request limit (queue + generation), seconds."),
        audit_db: Path | None = typer.Option(None, "--audit-db", help="SQLite audit log (time, request id, model, latency, tokens; never images)."),
        audit_questions: bool = typer.Option(False, "--audit-questions", help="Also store question text in the audit log."),
    ) -> None:
        """Serve a model: a web page for clinicians at / and the OpenAI chat-completions API at /v1."""
        from tinymed.serve.app import ServeConfig, load_served_model
        from tinymed.serve.app import serve as run_server
        from tinymed.serve.security import UnsafeBindError, check_bind

        err = Console(stderr=True)
        config = ServeConfig(
            api_key=api_key, model_name=model_name, max_tokens_limit=max_tokens, request_timeout_s=timeout,
            default_max_tokens=min(128, max_tokens), audit_db=audit_db, audit_questions=audit_questions,
            batch=BatchConfig(max_batch=max_batch, batch_wait_ms=batch_wait_ms, max_queue=max_queue),
        )
        try:
            check_bind(host, api_key)
            lm = load_served_model(model, device=device, quant=quant, linear_kernel=cpu_linear)
        except (UnsafeBindError, ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(1) from None
        Console().print(
            f"serving [bold]{config.model_name or lm.name}[/bold] (quant {lm.quant}, {lm.device}, linear {lm.linear_kernel}) at "
            f"http://{host}:{port}/ — decision support, not a diagnosis",
            highlight=False,
        )
        run_server(lm, config, host=host, port=port)
