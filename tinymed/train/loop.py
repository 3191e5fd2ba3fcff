"""The training loop: stage by stage, with `accelerate` (one CPU, one GPU or several GPUs unchanged).

Multi-GPU: `accelerate launch --num_processes 4 -m tinymed.cli finetune --dataset vqa-rad --path ...
--out runs/ft` (batch sizes are per process; one optimizer step = batch × grad_accum × processes
samples). Precision: fp32 on CPU, bf16 autocast on GPUs that support it (weights stay fp32).

Layout of `out_dir`: `init/` (the preset's initial model), `checkpoints/step-NNNNNN/`,
`train_log.jsonl`, `final/` (standard HF folder, or a peft adapter folder with keep_adapter),
`finetune_result.json`; `base/` (the adapter's base) when a LoRA stage follows another stage.
"""

from __future__ import annotations

import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from tinymed.io import append_jsonl, read_jsonl, write_folder_atomic, write_json_atomic, write_jsonl_atomic
from tinymed.train.checkpoint import TrainState, latest_checkpoint, read_state, save_checkpoint
from tinymed.train.config import FinetuneConfig, FinetuneResult, StageConfig
from tinymed.train.data import Collator, EpochSampler, VQATrainDataset, load_training_samples, preset_texts
from tinymed.train.stages import configure_stage, is_peft, merged, save_adapter, save_base
from tinymed.train.tower_cache import cached_tower

MAX_GRAD_NORM = 1.0
MODEL_INPUTS = ("input_ids", "attention_mask", "pixel_values")


@dataclass
class Run:
    """What every stage of one run shares."""

    config: FinetuneConfig
    accelerator: object
    dataset: VQATrainDataset
    processor: object
    state: TrainState
    resume_from: Path | None
    progress: object | None
    started: float = field(default_factory=time.perf_counter)
    base_seconds: float = 0.0

    @property
    def out(self) -> Path:
        return self.config.out_dir

    def seconds(self) -> float:
        """Training wall time so far, over every (resumed) run of this job."""
        return self.base_seconds + time.perf_counter() - self.started


def planned_steps(stage: StageConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a stage: `max_steps` if set, else ceil(epochs × ceil(batches / grad_accum))."""
    if stage.max_steps is not None:
        return stage.max_steps
    return max(1, math.ceil(stage.epochs * math.ceil(batches_per_epoch / stage.grad_accum)))


def mixed_precision(requested: str) -> str:
    """accelerate's `mixed_precision` for a FinetuneConfig.mixed_precision on this machine ("bf16" or "no")."""
    import torch

    if requested == "no":
        return "no"
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return "bf16" if requested == "bf16" and native else "no"


def _initial_model(config: FinetuneConfig, samples, accelerator, reuse: bool):
    """(model, processor): `config.model` loaded, or the composed model / tiny preset built once into
    out_dir/init."""
    import torch

    from tinymed.models import build_tiny_model, compose, load_model

    source = config.model
    if source is None:
        source = config.out_dir / "init"
        if accelerator.is_main_process and not (reuse and source.is_dir()):
            if config.compose is not None:
                model, processor = compose(config.compose)
            else:
                model, processor = build_tiny_model(preset_texts(samples), config.tiny)
            write_folder_atomic(source, lambda tmp: save_base(model, processor, tmp))
        accelerator.wait_for_everyone()
    loaded = load_model(source, device="cpu", dtype=torch.float32)
    return loaded.model, loaded.processor


def _start_fresh(out: Path, accelerator) -> None:
    """Forget an earlier run's checkpoints and log in `out` (a fresh run must not resume from them)."""
    if accelerator.is_main_process:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        (out / "train_log.jsonl").unlink(missing_ok=True)
    accelerator.wait_for_everyone()


def _trim_log(log_path: Path, global_step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (they will be written again)."""
    if log_path.exists():
        write_jsonl_atomic(log_path, [r for r in read_jsonl(log_path) if r["global_step"] <= global_step])


def finetune(config: FinetuneConfig, resume: bool = False, progress: bool = True) -> FinetuneResult:
    """Run every stage of `config` and write the final model to `out_dir/final`.

    resume=True continues from the newest complete checkpoint in `out_dir/checkpoints` (none: start
    fresh) and ends exactly where an uninterrupted run would."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    AcceleratorState._reset_state()  # one process may fine-tune again with another mixed precision
    accelerator = Accelerator(mixed_precision=mixed_precision(config.mixed_precision))
    set_seed(config.seed)
    out = config.out_dir
    resume_from = latest_checkpoint(out / "checkpoints") if resume else None
    if resume_from is None:
        _start_fresh(out, accelerator)
    samples, skipped_rows = load_training_samples(config)
    model, processor = _initial_model(config, samples, accelerator, reuse=resume_from is not None)
    state = read_state(resume_from) if resume_from else TrainState()
    if resume_from and accelerator.is_main_process:
        _trim_log(out / "train_log.jsonl", state.global_step)
    show = progress and accelerator.is_main_process
    with _progress_bar() if show else nullcontext() as bar:
        dataset = VQATrainDataset(samples, processor, cache_bytes=config.cache_mb << 20)
        run = Run(config, accelerator, dataset, processor, state, resume_from, bar, base_seconds=state.seconds)
        for index, stage in enumerate(config.stages):
            if index >= state.stage_index:
                model = _run_stage(run, index, stage, model)
    return _finish(run, model, skipped_rows)


def _run_stage(run: Run, index: int, stage: StageConfig, model):
    """Train one stage from its start, or from the checkpoint when resuming into it; returns the
    unwrapped model (LoRA merged unless it is the last stage and the adapter is kept)."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    acc, config, state = run.accelerator, run.config, run.state
    resuming = run.resume_from is not None and state.stage_index == index
    acc.free_memory()
    acc.gradient_accumulation_steps = stage.grad_accum
    if stage.lora and not resuming and index > 0 and config.keep_adapter and acc.is_main_process:
        write_folder_atomic(run.out / "base", lambda tmp: save_base(model, run.processor, tmp))
    tower = model.model.vision_tower  # the same module object inside a LoRA (peft) wrapper
    model = configure_stage(model, stage)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    lengths = run.dataset.text_lengths() if config.group_by_length else None
    sampler = EpochSampler(len(run.dataset), config.seed, lengths, stage.batch_size * acc.num_processes)
    loader = DataLoader(run.dataset, batch_size=stage.batch_size, sampler=sampler, num_workers=config.num_workers,
                        collate_fn=Collator(run.processor.tokenizer.pad_token_id))
    model, optimizer, loader = acc.prepare(model, optimizer, loader)
    total = planned_steps(stage, len(loader))
    # accelerate steps a prepared scheduler once per process per optimizer step: scale its horizon
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, round(stage.warmup_ratio * total) * acc.num_processes, total * acc.num_processes
    )
    scheduler = acc.prepare(scheduler)
    if resuming:
        acc.load_state(str(run.resume_from))
    else:
        state.stage_index, state.stage_step, state.epoch, state.batches_done = index, 0, 0, 0
        _reset_window(run)
    task = run.progress.add_task(stage.name, total=total, completed=state.stage_step, loss=float("nan"), sps=0.0) \
        if run.progress else None
    with cached_tower(tower, 0 if stage.train_vision else config.tower_cache_mb << 20):
        while state.stage_step < total:
            _run_epoch(run, index, stage, total, (model, optimizer, loader, scheduler, sampler), task)
    if latest_checkpoint(run.out / "checkpoints") != run.out / "checkpoints" / f"step-{state.global_step:06d}":
        _checkpoint(run)
    model = acc.unwrap_model(model)
    last = index == len(config.stages) - 1
    return model if (last and config.keep_adapter) else merged(model)


def answer_logits(model, batch: dict):
    """LM-head logits computed only at the positions that predict an answer token (a 262k-word head over
    every prompt position would be the largest matmul of a step): (logits [n_answer_tokens, vocab] in
    row-major order, the answer tokens they predict [n_answer_tokens], the answer mask [batch, length - 1])."""
    import torch

    from tinymed.models import IGNORE_INDEX

    targets = batch["labels"][:, 1:]
    answer = targets != IGNORE_INDEX
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = answer  # the position before each answer token predicts it
    logits = model(**{k: batch[k] for k in MODEL_INPUTS}, logits_to_keep=keep).logits
    return logits.reshape(-1, logits.shape[-1]), targets[answer], answer


def answer_loss(model, batch: dict, average: str = "token"):
    """Cross-entropy over the answer tokens (`answer_logits`).
    average="token": the mean over every answer token of the batch (the model's own loss);
    "sample": each sample's mean over its answer tokens, then the mean over samples."""
    import torch
    import torch.nn.functional as F

    logits, targets, answer = answer_logits(model, batch)
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    if average == "token":
        return losses.mean()
    per_sample = answer.sum(dim=1)
    owner = torch.repeat_interleave(torch.arange(len(per_sample)), per_sample)  # row-major = logits order
    return (losses / per_sample[owner]).sum() / (per_sample > 0).sum()


def _run_epoch(run: Run, index: int, stage: StageConfig, total: int, objects, task) -> None:
    """Iterate the rest of the current epoch (or as much of it as the stage's remaining steps need)."""
    model, optimizer, loader, scheduler, sampler = objects
    acc, state = run.accelerator, run.state
    per_batch = stage.batch_size * acc.num_processes
    start = state.batches_done * per_batch
    sampler.set_window(index, state.epoch, start, start + (total - state.stage_step) * stage.grad_accum * per_batch)
    step_loss, step_batches = 0.0, 0
    for batch in loader:
        with acc.accumulate(model):
            if "input_ids" in batch:
                loss = answer_loss(model, batch, stage.loss_average)
                acc.backward(loss)
                step_loss, step_batches = step_loss + loss.item(), step_batches + 1
                run.state.window_samples += len(batch["input_ids"]) * acc.num_processes
            if acc.sync_gradients:
                acc.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        state.skipped_ids = sorted(set(state.skipped_ids) | set(batch["skipped"]))
        state.batches_done += 1
        if state.batches_done * per_batch >= len(sampler.order):  # the epoch is over: a checkpoint says so
            state.epoch, state.batches_done = state.epoch + 1, 0
        if acc.sync_gradients:
            _after_step(run, stage, total, step_loss / max(step_batches, 1), (scheduler, sampler, task))
            step_loss, step_batches = 0.0, 0


def _after_step(run: Run, stage: StageConfig, total: int, loss: float, display) -> None:
    """Count the optimizer step; log, update the bar and checkpoint when due."""
    state, config = run.state, run.config
    state.stage_step += 1
    state.global_step += 1
    state.steps[stage.name] = state.stage_step
    state.last_loss = loss
    state.window_loss += loss
    state.window_batches += 1
    if state.stage_step % config.log_every == 0 or state.stage_step == total:
        _log(run, stage, *display)
    if state.global_step % config.save_every == 0:
        _checkpoint(run)


def _log(run: Run, stage: StageConfig, scheduler, sampler, task) -> None:
    state, now = run.state, run.seconds()
    epoch = state.epoch + state.batches_done * stage.batch_size * run.accelerator.num_processes / len(sampler.order)
    row = {
        "stage": stage.name,
        "step": state.stage_step,
        "global_step": state.global_step,
        "epoch": round(epoch, 4),
        "loss": state.window_loss / max(state.window_batches, 1),
        "lr": scheduler.get_last_lr()[0],
        "samples_per_s": round(state.window_samples / max(now - state.window_start, 1e-9), 2),
        "seconds": round(now, 2),
        "mixed_precision": run.accelerator.mixed_precision,
    }
    if run.accelerator.is_main_process:
        append_jsonl(run.out / "train_log.jsonl", row)
    if run.progress:
        run.progress.update(task, completed=state.stage_step, loss=row["loss"], sps=row["samples_per_s"])
    _reset_window(run)


def _reset_window(run: Run) -> None:
    state = run.state
    state.window_loss, state.window_batches, state.window_samples = 0.0, 0, 0
    state.window_start = run.seconds()


def _checkpoint(run: Run) -> None:
    run.state.seconds = run.seconds()
    save_checkpoint(run.accelerator, run.out / "checkpoints", run.state, run.config.keep_checkpoints)


def _progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[sps]:.1f} samples/s"),
        TimeElapsedColumn(), TimeRemainingColumn(),
    )


def _adapter_base(run: Run) -> str:
    """The base a kept adapter applies to: the LoRA stage's starting model."""
    lora_index = len(run.config.stages) - 1
    if lora_index > 0:
        return str((run.out / "base").resolve())
    return run.config.model or str((run.out / "init").resolve())


def _finish(run: Run, model, skipped_rows: int) -> FinetuneResult:
    """Write out_dir/final and finetune_result.json (main process); return the result."""
    acc, state = run.accelerator, run.state
    final = run.out / "final"
    if acc.is_main_process:
        if is_peft(model):
            write_folder_atomic(final, lambda tmp: save_adapter(model, run.processor, tmp, _adapter_base(run), final))
        else:
            write_folder_atomic(final, lambda tmp: save_base(model, run.processor, tmp))
    result = FinetuneResult(
        model_dir=final,
        steps=dict(state.steps),
        final_loss=state.last_loss,
        seconds=round(run.seconds(), 2),
        skipped=skipped_rows + len(state.skipped_ids),
        log_path=run.out / "train_log.jsonl",
    )
    if acc.is_main_process:
        write_json_atomic(run.out / "finetune_result.json", {
            **{k: str(v) if isinstance(v, Path) else v for k, v in result.__dict__.items()},
            "skipped_samples": state.skipped_ids,
            "config": run.config.model_dump(mode="json"),
        })
    acc.wait_for_everyone()
    return result
