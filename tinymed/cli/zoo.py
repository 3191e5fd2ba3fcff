"""CLI: `tinymed zoo` (the models tinymed ships by name) and `tinymed export hf|gguf`."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

zoo_app = typer.Typer(help="Models tinymed ships by name: list, assemble, retrain.", no_args_is_help=True)
export_app = typer.Typer(help="Write a model in a format other tools read.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add `zoo` and `export` to the app."""
    app.add_typer(zoo_app, name="zoo")
    app.add_typer(export_app, name="export")


@zoo_app.command("list")
def zoo_list() -> None:
    """The shipped names, their parts and whether their trained weights are installed."""
    from tinymed.models.zoo import ADAPTER_WEIGHTS, ZOO

    table = Table(title="tinymed zoo")
    for col in ("name", "language model", "vision", "image px", "weights"):
        table.add_column(col)
    for entry in ZOO.values():
        ok = (entry.weights / ADAPTER_WEIGHTS).is_file()
        table.add_row(entry.name, entry.parts.llm, entry.parts.vision, str(entry.parts.image_size),
                      "installed" if ok else "missing")
    Console().print(table)


@zoo_app.command("assemble")
def zoo_assemble(name: str = typer.Argument(..., help="A zoo name, e.g. tinymed-med-270m.")) -> None:
    """Assemble NAME into the cache (done automatically on first use); prints the folder."""
    from tinymed.models.zoo import assemble

    Console().print(str(_or_exit(lambda: assemble(name))), highlight=False)


@zoo_app.command("retrain")
def zoo_retrain(
    name: str = typer.Argument(..., help="A zoo name, e.g. tinymed-med-270m."),
    data: Path = typer.Option(Path("../shared/data"), "--data", help="Folder holding vqa-rad/, slake/, pathvqa/."),
    out: Path = typer.Option(..., "--out", help="Run folder (checkpoints, train_log.jsonl, final/)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest complete checkpoint in --out."),
    ship: bool = typer.Option(False, "--ship", help="Copy the trained adapter into the package's shipped weights."),
) -> None:
    """Retrain NAME with the exact recipe its shipped weights came from (resumable)."""
    from tinymed.train import finetune
    from tinymed.train.recipes import ship_adapter, zoo_recipe

    config = _or_exit(lambda: zoo_recipe(name, data, out))
    result = _or_exit(lambda: finetune(config, resume=resume))
    Console().print(f"steps {result.steps}, final loss {result.final_loss:.4f}, {result.seconds:.0f} s; "
                    f"adapter: {result.model_dir}", highlight=False)
    if ship:
        Console().print(f"shipped to {_or_exit(lambda: ship_adapter(result.model_dir, name))}", highlight=False)


@export_app.command("hf")
def export_hf(
    model: str = typer.Option(..., "--model", help="A zoo name, or a checkpoint folder."),
    out: Path = typer.Option(..., "--out", help="Folder to write (a plain transformers folder)."),
) -> None:
    """Write MODEL as a standard transformers folder: `AutoModelForImageTextToText.from_pretrained` +
    `AutoProcessor.from_pretrained` load it, no custom code."""
    from tinymed.models.export import export_hf as run_export

    Console().print(f"wrote {_or_exit(lambda: run_export(model, out))}", highlight=False)


@export_app.command("gguf")
def export_gguf(
    model: str = typer.Option(..., "--model", help="A zoo name, or a checkpoint folder (Gemma-3 or Llama LM)."),
    quant: str = typer.Option("q4_k_m", "--quant", help="f16, q8_0, q4_k_m or q4_0 (llama.cpp's quantizer)."),
    out: Path = typer.Option(..., "--out", help="Edge folder to write (GGUF LM + PyTorch vision part)."),
    tokenizer_gguf: Path | None = typer.Option(
        None, "--tokenizer-gguf", help="The GGUF the LM came from, when its tokenizer has no tokenizer.model."),
    trim_vocab: int | None = typer.Option(
        None, "--trim-vocab", min=0, help="Keep only the training data's tokens, the special pieces and the N "
        "most frequent general-English tokens (wordfreq); the rest of the vocabulary is dropped."),
    train_config: Path | None = typer.Option(
        None, "--train-config", help="With --trim-vocab: the finetune config (JSON) MODEL was trained with; "
        "zoo models use their recipe."),
    data: Path = typer.Option(Path("../shared/data"), "--data",
                              help="With --trim-vocab and a zoo model: the folder its recipe reads."),
    untie_head: bool = typer.Option(
        False, "--untie-head", help="q4_0/q4_k_m: write the LM head as its own IQ4_NL tensor, which llama.cpp's CPU "
        "repack kernels run (a head tied to the input embedding cannot be repacked): 1.6-1.9× faster decode on "
        "tinymed-med-270m, at the head's size more on disk."),
) -> None:
    """Write MODEL as an edge folder that `evaluate`, `profile` and `serve` answer from through llama.cpp
    (needs `tinymed[edge]`, which ./setup.sh installs)."""
    from tinymed.models.gguf import VocabularyTrim
    from tinymed.models.gguf import export_gguf as run_export

    trim = None
    if trim_vocab is not None:
        samples = _or_exit(lambda: _training_samples(model, train_config, data))
        trim = VocabularyTrim(training_samples=samples, top_n=trim_vocab)
    with Console().status(f"converting {model} to GGUF ({quant}) with llama.cpp's tools"):
        folder = _or_exit(lambda: run_export(model, quant, out, tokenizer_gguf, trim, untie_head))
    Console().print(f"wrote {folder}", highlight=False)


def _training_samples(model: str, train_config: Path | None, data: Path) -> list:
    """The samples MODEL was trained on: its finetune config's datasets, or a zoo model's recipe."""
    from tinymed.models.zoo import is_zoo_name
    from tinymed.train.config import FinetuneConfig
    from tinymed.train.data import load_training_samples
    from tinymed.train.recipes import zoo_recipe

    if train_config is not None:
        config = FinetuneConfig.model_validate_json(train_config.read_text(encoding="utf-8"))
    elif is_zoo_name(model):
        config = zoo_recipe(model, data, out_dir=".")
    else:
        raise ValueError("--trim-vocab keeps the training data's tokens: give --train-config (the finetune "
                         "config MODEL was trained with)")
    return load_training_samples(config)[0]


def _or_exit(action):
    """Run `action`; a known failure prints one clear line and exits 1."""
    try:
        return action()
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
