"""Training-speed levers for the real model (Gemma-3-270M + EfficientNet-Lite0, LoRA), measured in one run.

Each row times optimizer steps (forward + backward + AdamW) on the same real VQA-RAD batches and prints
samples/s and the ratio to the first row. Levers: LM-head logits at every position vs only where an
answer token is predicted; input resolution (image tokens = (size/32)²); how much of a step the frozen
vision tower costs (what caching its features could save at most).

    python bench/train_levers.py --data ../shared/data/vqa-rad --steps 4
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from tinymed.data import load_dataset
from tinymed.models import ComposeConfig, compose, encode_for_training
from tinymed.train.config import StageConfig
from tinymed.train.data import Collator
from tinymed.train.loop import MODEL_INPUTS, answer_loss
from tinymed.train.stages import configure_stage


def _batches(processor, samples, batch_size: int, steps: int) -> list[dict]:
    collate = Collator(processor.tokenizer.pad_token_id)
    rows = [encode_for_training(processor, s.load_image(), s.question, s.answer) for s in samples[: batch_size * steps]]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


def _full_loss(model, batch):
    return model(**{k: batch[k] for k in MODEL_INPUTS}, labels=batch["labels"]).loss


def _time_steps(model, batches, loss_fn) -> float:
    """Seconds per optimizer step, the first (warm-up) step excluded."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for batch in batches:
        start = time.perf_counter()
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / max(len(times) - 1, 1)


def _tower_seconds(model, batch) -> float:
    inner = model.get_base_model().model
    with torch.no_grad():
        start = time.perf_counter()
        inner.vision_tower(batch["pixel_values"])
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="../shared/data/vqa-rad")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per row (+1 warm-up)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sizes", default="224,160", help="input resolutions to compare (pixels)")
    args = parser.parse_args()
    samples = load_dataset("vqa-rad", args.data, "train").samples
    stage = StageConfig(name="instruct", lr=1e-4, batch_size=args.batch_size, lora=True)
    table = Table(title=f"training step speed, batch {args.batch_size}, LoRA r=16 on every LM linear layer, "
                        f"{torch.get_num_threads()} threads")
    for col in ("image size", "tokens/sample", "logits", "s/step", "samples/s", "vs first", "tower share"):
        table.add_column(col, justify="right")
    first = None
    for size in (int(s) for s in args.sizes.split(",")):
        model, processor = compose(ComposeConfig(llm="gemma-3-270m-gguf", vision="efficientnet-lite0", image_size=size))
        model = configure_stage(model, stage)
        batches = _batches(processor, samples, args.batch_size, args.steps + 1)
        tokens = sum(b["input_ids"].numel() for b in batches) / (len(batches) * args.batch_size)
        tower = _tower_seconds(model, batches[0])
        for label, fn in (("every position", _full_loss), ("answer only", answer_loss)):
            if size != int(args.sizes.split(",")[0]) and label == "every position":
                continue
            seconds = _time_steps(model, batches, fn)
            first = first or seconds
            table.add_row(str(size), f"{tokens:.0f}", label, f"{seconds:.2f}", f"{args.batch_size / seconds:.2f}",
                          f"{first / seconds:.2f}×", f"{tower / seconds:.1%}")
        del model
    Console().print(table)


if __name__ == "__main__":
    main()
