"""Typed configuration and result of a fine-tuning run (stage 1 alignment, stage 2 instruction tuning)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from tinymed.data.registry import DatasetSpec as _LoadSpec
from tinymed.data.synthetic import SynthConfig
from tinymed.models.compose import ComposeConfig
from tinymed.models.tiny import TinyConfig


class DatasetSpec(_LoadSpec):
    """One dataset split to train on; `path=None` = the Hub copy, or the default synthetic set."""

    split: str = "train"


class StageConfig(BaseModel):
    """One training stage.

    align: only the projector trains (vision tower and LM frozen).
    instruct: projector + LM train (full, or LoRA on the LM's linear layers); the vision tower only
    with `train_vision`. `max_steps`, when set, overrides `epochs` (counted in optimizer steps; one
    optimizer step = `grad_accum` batches of `batch_size` samples per process)."""

    name: Literal["align", "instruct"]
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    lr: float = Field(gt=0)
    batch_size: int = Field(ge=1)
    grad_accum: int = Field(1, ge=1)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay")
    lora: bool = False
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    train_vision: bool = False
    loss_average: Literal["token", "sample"] = Field(
        "token", description="token: mean over every answer token of the batch (LLaVA's loss); sample: "
                             "mean over each sample's answer tokens, then over samples (a one-word answer "
                             "weighs as much as a one-line description)")


class FinetuneConfig(BaseModel):
    """A fine-tuning run: datasets (concatenated), the initial model, the stages, where to write.

    `model` = any LLaVA-style checkpoint (folder or Hub id); else `compose` = pretrained parts put
    together at the start (e.g. Gemma-3-270M + EfficientNet-Lite0); neither = the `tiny` preset built
    from the training text. `save_every` and `log_every` count optimizer steps. `limit` caps each dataset."""

    datasets: list[DatasetSpec] = Field(min_length=1)
    model: str | None = None
    compose: ComposeConfig | None = None
    preset: Literal["tiny"] = "tiny"
    tiny: TinyConfig = Field(default_factory=TinyConfig)
    stages: list[StageConfig] = Field(min_length=1)
    out_dir: Path
    save_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)
    skip_invalid: bool = False
    keep_adapter: bool = False
    log_every: int = Field(5, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (images load in workers)")
    group_by_length: bool = Field(False, description="batches of similar length (less padding; see EpochSampler)")
    cache_mb: int = Field(2048, ge=0, description="MiB of decoded pixel values kept in memory across epochs "
                                                  "(per DataLoader worker; 0 = decode every image every epoch)")
    tower_cache_mb: int = Field(0, ge=0, description="MiB of a frozen vision tower's outputs kept across a stage "
                                                     "(each image through the tower once; 0 = off, every batch)")
    mixed_precision: Literal["auto", "no", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on a CUDA GPU that supports it, float32 elsewhere; no: float32; "
                            "bf16: bf16 autocast on such a GPU or on a CPU with native bf16 arithmetic "
                            "(AVX512-BF16 or AMX), float32 on other CPUs, where emulated bf16 is slower")


@dataclass
class FinetuneResult:
    """Where the final model is, optimizer steps per stage, the last step's loss, wall time (all runs
    of a resumed job together), samples left out (unloadable rows + unreadable images)."""

    model_dir: Path
    steps: dict[str, int]
    final_loss: float
    seconds: float
    skipped: int
    log_path: Path


def default_stages(
    epochs: float | None = None,
    max_steps: int | None = None,
    lr_align: float = 1e-3,
    lr_instruct: float = 1e-3,
    batch_size: int = 16,
    grad_accum: int = 1,
    lora: bool = False,
) -> list[StageConfig]:
    """Both stages with the tiny preset's CPU defaults (see `demo_stages` for the measured choice).

    `epochs`/`max_steps` apply to both stages when given; otherwise align runs 0.25 epoch (it only
    has to put image features where the LM can read them) and instruct 2 epochs."""
    return [
        StageConfig(name="align", epochs=epochs or 0.25, max_steps=max_steps, lr=lr_align,
                    batch_size=batch_size, grad_accum=grad_accum),
        StageConfig(name="instruct", epochs=epochs or 2.0, max_steps=max_steps, lr=lr_instruct,
                    batch_size=batch_size, grad_accum=grad_accum, lora=lora),
    ]


# The demo's model (issue 13, bench/demo_levers.py, README): the ImageNet EfficientNet-Lite0 tower, frozen, on a
# 64 × 128 (rows × columns) input, so its 2 × 4 grid of 8 image tokens has a column boundary on the midline
# and a lesion's side is which tokens it is in; the random SigLIP-style ViT's 16 tokens did not carry the
# lesion count (COUNT 53.3%), and Lite0's 3 × 3 grid at 96 px left POS at 47.6-61.9% over three seeds.
# A random-init 2-layer Llama LM with 8 heads of 16 dimensions, image first.
DEMO_MODEL = TinyConfig(vision="efficientnet-lite0", image_size=64, image_width=128, heads=8)
# The frozen tower's outputs are computed once per image and kept for the stage (8 × 1280 floats, 41 KB an
# image; the 14,400 train questions have 3,550 images): Lite0 run on every
# batch made a lever train at 62 samples/s against ≈420 cached (tower_cache.py).
DEMO_TOWER_CACHE_MB = 2048
# The demo's synthetic set: 14,400 train questions, 3x the default 4,800 (more images beat more epochs,
# 68.2% vs 65.3%); the test split is the default set's, byte for byte. Asking the verification questions
# more often in the train split (`train_emphasis`) moved which kinds were learned, not how many (README).
DEMO_DATA = SynthConfig(n_train=14_400)


def demo_stages() -> list[StageConfig]:
    """What `tinymed demo` trains: `DEMO_MODEL` from scratch on `DEMO_DATA`'s train split.

    Full fine-tuning (the LM starts random, so LoRA cannot work). Measured 2026-12-03 on the 2-core CPU VM
    (bench/demo_levers.py, closed % on the test split): at LR 4e-3, 4 epochs → 71.1, 6 → 74.2, 8 → 76.1; at
    LR 2e-3, 6 epochs → 82.3 / 72.7 / 81.1 (seeds 0 / 1 / 2), 8 epochs → 83.5 / 77.0 / 78.7 (within the
    seed spread), and with 8 heads (2026-12-04) 88.3 / 87.1 / 86.1, in ≈4-5 min of training. With the
    frozen Lite0 tower on a 64 × 128 input (2026-12-04): 11 epochs → 95.0 / 90.7 / 90.9 (≈260 s; POS 52.4
    with seed 2), 15 epochs → 94.7 / 96.9 / 91.9 (≈350 s), every closed kind ≥ 65% in all three seeds."""
    return [
        StageConfig(name="align", epochs=0.25, lr=1e-3, batch_size=64),
        StageConfig(name="instruct", epochs=15.0, lr=2e-3, batch_size=64),
    ]
