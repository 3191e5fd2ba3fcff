"""Crash-safe checkpoints: `accelerate` state (weights, optimizer, scheduler, RNG of every process) +
`trainer_state.json` (stage, step counters, data-order position), written into a hidden temp folder,
fsynced, then renamed to `step-NNNNNN`. A folder only gets its final name when complete, so a run
killed mid-write (even `kill -9`) leaves a `.tmp-*` folder that resume ignores and the next save
replaces."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from pydantic import BaseModel, Field

from tinymed.io import fsync_dir, fsync_tree

STATE_FILE = "trainer_state.json"
CHECKPOINT_NAME = re.compile(r"^step-(\d+)$")


class TrainState(BaseModel):
    """Where training stands. Steps count optimizer steps; `batches_done` counts this process's
    batches in the current epoch (the resumed sampler starts at batches_done × batch × processes)."""

    stage_index: int = 0
    stage_step: int = 0
    global_step: int = 0
    epoch: int = 0
    batches_done: int = 0
    steps: dict[str, int] = Field(default_factory=dict)
    last_loss: float = float("nan")
    seconds: float = 0.0
    skipped_ids: list[str] = Field(default_factory=list)
    window_loss: float = 0.0
    window_batches: int = 0
    window_samples: int = 0
    window_start: float = 0.0


def save_checkpoint(accelerator, root: Path, state: TrainState, keep: int) -> Path:
    """Save the prepared objects + `state` as `root/step-{global_step}`; keep the newest `keep`.
    Every process must call it (each writes its own RNG state)."""
    target = root / f"step-{state.global_step:06d}"
    tmp = root / f".tmp-{target.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(state.model_dump_json(indent=2), encoding="utf-8")
        fsync_tree(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        fsync_dir(root)
        for old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return target


def complete_checkpoints(root: Path) -> list[Path]:
    """Finished checkpoints under `root`, oldest first (temp folders and strays are ignored)."""
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), p)
        for p in root.iterdir()
        if (match := CHECKPOINT_NAME.match(p.name)) and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1] if found else None


def read_state(checkpoint: Path) -> TrainState:
    return TrainState.model_validate_json((checkpoint / STATE_FILE).read_text(encoding="utf-8"))
