"""What makes the demo's tiny model read its images: each lever trained the same way on the synthetic set.

Every row fine-tunes one tiny-preset variant (align stage, then the instruct stage for `--epochs`) on the
train split and scores fp32 greedy answers on the test split: closed accuracy and open recall (LLaVA-Med),
and closed accuracy per question kind, beside the question-only baseline of the same train split. Levers:
the tower (random SigLIP-style ViT frozen as before, the same ViT trained, ImageNet EfficientNet-Lite0
frozen), input resolution and image-token count, the LM's depth and width, the prompt order (question
before the image), and (`--n-train`, `--emphasis`, `--paired`) how many training questions the generator writes,
which kinds it asks more often and whether it asks each value verification both ways of the same image (the
test split depends on none); `--epochs`, `--batch-size`, `--lr`,
`--loss-average` set the instruct stage, `--seed` the initialisation and data order, `--tower-cache-mb`
whether a frozen tower's outputs are kept per image (what makes the Lite0 levers affordable). Left unset, they are
the demo's (`tinymed.train.DEMO_DATA`, `demo_stages()`).

    .venv/bin/python bench/demo_levers.py --levers vit-frozen,vit-trained,lite0-128 --epochs 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tinymed.data import load_dataset
from tinymed.data.synthetic import SynthConfig, ensure_default_dataset, parse_emphasis
from tinymed.evaluate.baseline import QuestionOnlyBaseline
from tinymed.evaluate.metrics import score_predictions
from tinymed.evaluate.runner import EvalConfig, evaluate, prediction_record
from tinymed.models import TinyConfig
from tinymed.train import DEMO_DATA, DatasetSpec, FinetuneConfig, finetune
from tinymed.train.config import StageConfig, demo_stages

KINDS = ("ABN", "COLOR", "COUNT", "MODALITY", "ORGAN", "PLANE", "POS", "PRES", "SIZE")
LEVERS: dict[str, tuple[TinyConfig, bool]] = {  # name → (model, whether the instruct stage trains the tower)
    "vit-frozen": (TinyConfig(), False),  # the demo before issue 13: random tower, never trained
    "vit-trained": (TinyConfig(), True),
    "vit-trained-128": (TinyConfig(image_size=128, patch_size=32), True),
    "vit-frozen-lm4": (TinyConfig(text_layers=4), False),
    "vit-frozen-image-last": (TinyConfig(image_after_question=True), False),
    "vit-trained-image-last": (TinyConfig(image_after_question=True), True),
    "vit-frozen-image-last-lm256": (TinyConfig(image_after_question=True, text_hidden=256), False),
    "vit-frozen-image-last-tied": (TinyConfig(image_after_question=True, tie_embeddings=True), False),
    "vit-frozen-image-last-lm4": (TinyConfig(image_after_question=True, text_layers=4), False),
    "vit-frozen-image-last-mlp4x": (TinyConfig(image_after_question=True, text_mlp_ratio=4), False),
    "vit-frozen-image-last-mlp8x": (TinyConfig(image_after_question=True, text_mlp_ratio=8), False),
    "vit-frozen-image-last-heads8": (TinyConfig(image_after_question=True, heads=8), False),
    "vit-frozen-image-last-heads16": (TinyConfig(image_after_question=True, heads=16), False),
    "vit-trained-image-last-heads8": (TinyConfig(image_after_question=True, heads=8), True),
    "vit-frozen-image-last-heads8-lm3": (TinyConfig(image_after_question=True, heads=8, text_layers=3), False),
    "vit-frozen-image-last-heads8-128": (
        TinyConfig(image_after_question=True, heads=8, image_size=128, patch_size=32), False),
    "vit-trained-lm4": (TinyConfig(text_layers=4), True),
    "vit-trained-lm256": (TinyConfig(text_hidden=256), True),
    "lite0-96": (TinyConfig(vision="efficientnet-lite0", image_size=96), False),
    "lite0-128": (TinyConfig(vision="efficientnet-lite0", image_size=128), False),
    "lite0-160": (TinyConfig(vision="efficientnet-lite0", image_size=160), False),
    "lite0-224": (TinyConfig(vision="efficientnet-lite0", image_size=224), False),
    "lite0-96-heads8": (TinyConfig(vision="efficientnet-lite0", image_size=96, heads=8), False),
    "lite0-96x128-heads8": (TinyConfig(vision="efficientnet-lite0", image_size=96, image_width=128, heads=8), False),
    "lite0-64x128-heads8": (TinyConfig(vision="efficientnet-lite0", image_size=64, image_width=128, heads=8), False),
    "lite0-128-heads8": (TinyConfig(vision="efficientnet-lite0", image_size=128, heads=8), False),
    "lite0-160-heads8": (TinyConfig(vision="efficientnet-lite0", image_size=160, heads=8), False),
    "lite0-128-image-last-heads8": (
        TinyConfig(vision="efficientnet-lite0", image_size=128, image_after_question=True, heads=8), False),
}


def _row(name: str, metrics: dict, seconds: float | None) -> list[str]:
    def cell(value) -> str:
        return "—" if value is None else f"{value:.1f}"

    kinds = metrics["by"].get("question_type", {})
    per_kind = [cell(kinds[k]["llava_med"]["closed_accuracy"]) if k in kinds else "—" for k in KINDS]
    lm = metrics["llava_med"]
    return [name, cell(seconds), cell(lm["closed_accuracy"]), cell(lm["open_recall"]), *per_kind]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated, of: {', '.join(LEVERS)}")
    demo = demo_stages()[-1]  # defaults: the demo's recipe
    parser.add_argument("--epochs", type=float, default=demo.epochs, help="instruct-stage epochs (align: 0.25)")
    parser.add_argument("--lr", type=float, default=demo.lr, help="instruct-stage learning rate")
    parser.add_argument("--weight-decay", type=float, default=demo.weight_decay, help="instruct-stage AdamW decay")
    parser.add_argument("--batch-size", type=int, default=demo.batch_size, help="both stages")
    parser.add_argument("--n-train", type=int, default=DEMO_DATA.n_train, help="training questions generated")
    parser.add_argument("--loss-average", choices=("token", "sample"), default="token", help="instruct-stage loss")
    parser.add_argument("--emphasis", default="", help="train-split kind weights, e.g. organ_yesno=3,plane_yesno=3 "
                                                           "(SynthConfig.train_emphasis; the test split is unchanged)")
    parser.add_argument("--paired", action="store_true",
                        help="train split asks each value verification both ways of its image (SynthConfig.train_paired)")
    parser.add_argument("--seed", type=int, default=0, help="model initialisation and data order")
    parser.add_argument("--tower-cache-mb", type=int, default=0,
                        help="keep a frozen tower's outputs per image (FinetuneConfig.tower_cache_mb; the demo: 0)")
    parser.add_argument("--group-by-length", action="store_true",
                        help="length-grouped batches (FinetuneConfig.group_by_length; the demo: off)")
    parser.add_argument("--eval-limit", type=int, default=None, help="score only the first N test questions")
    parser.add_argument("--out", type=Path, default=None, help="keep runs here (default: a temporary folder)")
    args = parser.parse_args()
    emphasis = parse_emphasis(item for item in args.emphasis.split(",") if item)
    synth = SynthConfig(n_train=args.n_train, train_emphasis=emphasis, train_paired=args.paired)
    data = str(ensure_default_dataset(synth))
    out = args.out or Path(tempfile.mkdtemp(prefix="tinymed-demo-levers-"))
    stages = lambda train_vision: [  # noqa: E731
        StageConfig(name="align", epochs=0.25, lr=1e-3, batch_size=args.batch_size),
        StageConfig(name="instruct", epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                    train_vision=train_vision, loss_average=args.loss_average, weight_decay=args.weight_decay),
    ]
    asked = f" ({args.emphasis})" if emphasis else ""
    asked += " (verifications paired)" if args.paired else ""
    asked += " (length-grouped batches)" if args.group_by_length else ""
    table = Table(title=f"demo levers: {args.n_train} training questions{asked}, instruct {args.epochs:g} epochs at "
                        f"lr {args.lr:g}, weight decay {args.weight_decay:g}, batch {args.batch_size}, "
                        f"{args.loss_average}-mean loss, seed {args.seed}; "
                        "closed accuracy per kind (%)")
    for column in ("lever", "train s", "closed", "open recall", *KINDS):
        table.add_column(column, justify="right")
    test = load_dataset("synthetic", data, "test", limit=args.eval_limit).samples
    baseline = QuestionOnlyBaseline(load_dataset("synthetic", data, "train").samples)
    table.add_row(*_row("question-only baseline", score_predictions(
        [prediction_record(s, baseline.predict(s), None) for s in test]), None))
    for name in args.levers.split(","):
        tiny, train_vision = LEVERS[name]
        start = time.perf_counter()
        trained = finetune(FinetuneConfig(datasets=[DatasetSpec(name="synthetic", path=data)],
                                          tiny=tiny.model_copy(update={"seed": args.seed}), seed=args.seed,
                                          stages=stages(train_vision), out_dir=out / name,
                                          tower_cache_mb=args.tower_cache_mb,
                                          group_by_length=args.group_by_length), progress=False)
        seconds = time.perf_counter() - start
        result = evaluate(EvalConfig(model=str(trained.model_dir), dataset="synthetic", path=data, out_dir=out / name / "eval",
                                     batch_size=16, max_new_tokens=24, limit=args.eval_limit, device="cpu"))
        table.add_row(*_row(name, result.metrics, seconds))
        Console().print(f"{name}: closed {result.metrics['llava_med']['closed_accuracy']:.1f}, "
                        f"train {seconds:.0f} s", highlight=False)
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
