"""Train stage: what each stage trains, answer-only loss, padding, accumulation, checkpoints + resume
after kill -9, LoRA merge, and the output folders."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tinymed.cli.finetune import pair_datasets
from tinymed.models import IGNORE_INDEX, TinyConfig, encode_for_training, load_model
from tinymed.train import DatasetSpec, FinetuneConfig, StageConfig, finetune
from tinymed.data import load_dataset
from tinymed.train.data import Collator, EpochSampler, VQATrainDataset
from tinymed.train.loop import answer_loss, mixed_precision, planned_steps

REPO = Path(__file__).resolve().parents[1]
TINY = TinyConfig(text_layers=2, image_size=32, vision_layers=1)
COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 40)}
N_GOOD = 24


def _write_dataset(folder: Path) -> Path:
    """24 readable samples (is it <color>? yes/no) + 1 row whose image file is corrupt."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i in range(N_GOOD):
        name = list(COLORS)[i % 3]
        Image.new("RGB", (40, 40), COLORS[name]).save(folder / "images" / f"{i}.png")
        asked = list(COLORS)[(i // 3) % 3]
        answer = "yes" if asked == name else "no"
        records.append({"id": str(i), "image": f"{i}.png", "answer_type": "CLOSED",
                        "conversations": [{"from": "human", "value": f"<image>\nIs the image {asked}?"},
                                          {"from": "gpt", "value": answer}]})
    (folder / "images" / "broken.png").write_bytes(b"not a png")
    records.append({"id": "broken", "image": "broken.png", "answer_type": "OPEN",
                    "conversations": [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]})
    (folder / "train.json").write_text(json.dumps(records))
    return folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return _write_dataset(tmp_path_factory.mktemp("data"))


def _config(data_dir: Path, out: Path, stages: list[StageConfig], **kwargs) -> FinetuneConfig:
    return FinetuneConfig(datasets=[DatasetSpec(name="llava-med", path=str(data_dir))], tiny=TINY, stages=stages,
                          out_dir=out, log_every=1, **kwargs)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


ALIGN = StageConfig(name="align", max_steps=2, lr=1e-2, batch_size=4)
INSTRUCT = StageConfig(name="instruct", max_steps=3, lr=1e-2, batch_size=4)


@pytest.fixture(scope="module")
def align_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    return out, finetune(_config(data_dir, out, [ALIGN]), progress=False)


@pytest.fixture(scope="module")
def two_stage_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    return out, finetune(_config(data_dir, out, [ALIGN, INSTRUCT]), progress=False)


def test_align_changes_only_the_projector(align_run):
    out, result = align_run
    changed = _changed(_weights(out / "init"), _weights(result.model_dir))
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert result.steps == {"align": 2}


def test_unreadable_image_is_skipped_and_counted(align_run, data_dir, tmp_path, caplog):
    assert align_run[1].skipped == 1
    with caplog.at_level(logging.WARNING, logger="tinymed.train"):
        stage = StageConfig(name="align", epochs=1, lr=1e-3, batch_size=25)
        result = finetune(_config(data_dir, tmp_path, [stage]), progress=False)
    assert result.skipped == 1 and result.steps == {"align": 1}
    assert any("broken.png" in r.getMessage() and "row broken" in r.getMessage() for r in caplog.records)


def test_instruct_full_trains_projector_and_lm_not_vision(two_stage_run):
    out, result = two_stage_run
    changed = _changed(_weights(out / "init"), _weights(result.model_dir))
    assert any("language_model" in k for k in changed) and any("lm_head" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)
    assert result.steps == {"align": 2, "instruct": 3}


def test_outputs_log_and_standard_final_folder(two_stage_run):
    from transformers import AutoProcessor

    out, result = two_stage_run
    rows = [json.loads(line) for line in result.log_path.read_text().splitlines()]
    assert [r["global_step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [(r["stage"], r["step"]) for r in rows][1:3] == [("align", 2), ("instruct", 1)]
    assert {"stage", "step", "epoch", "loss", "lr", "samples_per_s", "seconds"} <= set(rows[0])
    assert {"config.json", "model.safetensors", "processor_config.json"} <= {p.name for p in result.model_dir.iterdir()}
    assert "ASSISTANT" in AutoProcessor.from_pretrained(result.model_dir).chat_template
    saved = json.loads((out / "finetune_result.json").read_text())
    assert saved["steps"] == {"align": 2, "instruct": 3} and math.isclose(saved["final_loss"], result.final_loss)
    assert load_model(result.model_dir, device="cpu").model is not None


def test_collated_batch_has_loss_on_answers_only(align_run):
    processor = load_model(align_run[0] / "final", device="cpu").processor
    image = Image.new("RGB", (40, 40), COLORS["red"])
    short = encode_for_training(processor, image, "Is it red?", "yes")
    long = encode_for_training(processor, image, "Is the image in this scan red or blue?", "red and a bit of blue")
    batch = Collator(processor.tokenizer.pad_token_id)([short, long])
    n = len(short["input_ids"])
    n_answer = int((short["labels"] != IGNORE_INDEX).sum())
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0, :n].all() and not batch["attention_mask"][0, n:].any()  # right padding
    assert (batch["input_ids"][0, n:] == processor.tokenizer.pad_token_id).all()
    assert (batch["labels"][0, : n - n_answer] == IGNORE_INDEX).all()  # prompt + image tokens
    assert (batch["labels"][0, n - n_answer : n] == short["input_ids"][n - n_answer :]).all()
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()  # padding
    assert batch["pixel_values"].shape[0] == 2


def test_sample_mean_loss_weighs_each_answer_equally(align_run):
    import torch.nn.functional as F

    loaded = load_model(align_run[0] / "final", device="cpu")
    image = Image.new("RGB", (40, 40), COLORS["red"])
    examples = [encode_for_training(loaded.processor, image, "Is it red?", "yes"),
                encode_for_training(loaded.processor, image, "What color?", "red and a bit of blue and green")]
    batch = Collator(loaded.processor.tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        logits = loaded.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        per_sample = []
        for row in range(2):
            answer = batch["labels"][row, 1:] != IGNORE_INDEX
            per_sample.append(F.cross_entropy(logits[row, :-1][answer], batch["labels"][row, 1:][answer], reduction="none"))
        token_mean = torch.cat(per_sample).mean()
        sample_mean = (per_sample[0].mean() + per_sample[1].mean()) / 2
        assert len(per_sample[0]) < len(per_sample[1])
        assert torch.allclose(answer_loss(loaded.model, batch), token_mean, atol=1e-5)
        assert torch.allclose(answer_loss(loaded.model, batch, "sample"), sample_mean, atol=1e-5)
        assert not torch.allclose(token_mean, sample_mean, atol=1e-3)


def _counting_image_loads(monkeypatch) -> list[str]:
    from tinymed.data import MedVQASample

    loads, load = [], MedVQASample.load_image
    monkeypatch.setattr(MedVQASample, "load_image", lambda self: (loads.append(self.image), load(self))[1])
    return loads


def test_later_epochs_reuse_encoded_examples_within_the_cache_budget(align_run, data_dir, monkeypatch):
    processor = load_model(align_run[0] / "final", device="cpu").processor
    samples = load_dataset("llava-med", str(data_dir), "train").samples
    loads = _counting_image_loads(monkeypatch)
    cached = VQATrainDataset(samples, processor, cache_bytes=1 << 20)
    first = [cached[i] for i in range(len(samples))]
    second = [cached[i] for i in range(len(samples))]
    assert len(loads) == N_GOOD + 1 + 1  # each image once, the broken one every time
    assert sum("skipped" in e for e in second) == 1
    for a, b in zip(first, second):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != "skipped")
    uncached = VQATrainDataset(samples, processor, cache_bytes=0)
    loads.clear()
    for _ in range(2):
        again = [uncached[i] for i in range(len(samples))]
    assert len(loads) == 2 * (N_GOOD + 1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(first, again) for k in a if k != "skipped")


def test_gradient_accumulation_step_count(data_dir, tmp_path):
    # 25 rows → 7 batches of 4 per epoch → ceil(7 / 3) = 3 optimizer steps per epoch
    stage = StageConfig(name="align", epochs=2, lr=1e-3, batch_size=4, grad_accum=3)
    assert planned_steps(stage, 7) == 6
    result = finetune(_config(data_dir, tmp_path, [stage]), progress=False)
    assert result.steps == {"align": 6}
    epochs = [json.loads(line)["epoch"] for line in result.log_path.read_text().splitlines()]
    assert epochs[2] == 1.0 and epochs[-1] == 2.0


def test_bf16_autocast_runs_only_where_the_cpu_computes_bf16(data_dir, tmp_path, monkeypatch):
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert mixed_precision("no") == mixed_precision("auto") == "no"  # auto: bf16 only on a CUDA GPU
    assert mixed_precision("bf16") == ("bf16" if native else "no")
    stage = StageConfig(name="align", max_steps=2, lr=1e-2, batch_size=4)
    fp32 = finetune(_config(data_dir, tmp_path / "fp32", [stage]), progress=False)
    bf16 = finetune(_config(data_dir, tmp_path / "bf16", [stage], mixed_precision="bf16"), progress=False)
    logged = {json.loads(line)["mixed_precision"] for line in bf16.log_path.read_text().splitlines()}
    assert logged == {mixed_precision("bf16")}
    assert (bf16.final_loss != fp32.final_loss) == native  # bf16 matmuls round differently
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    emulated = finetune(_config(data_dir, tmp_path / "emulated", [stage], mixed_precision="bf16"), progress=False)
    assert emulated.final_loss == fp32.final_loss  # no native bf16: float32, as fast as it gets there
    assert not _changed(_weights(fp32.model_dir), _weights(emulated.model_dir))


def test_weight_decay_shrinks_what_the_stage_trains(data_dir, tmp_path):
    norms = {}
    for decay in (0.0, 50.0):  # lr × 50: AdamW scales the trained weights by 0.5, then 0.75 (cosine lr), then updates
        stage = StageConfig(name="align", max_steps=2, lr=1e-2, batch_size=4, weight_decay=decay)
        result = finetune(_config(data_dir, tmp_path / str(decay), [stage]), progress=False)
        weights = _weights(result.model_dir)
        norms[decay] = sum(float(w.norm()) for k, w in weights.items() if "multi_modal_projector" in k and "weight" in k)
    assert norms[50.0] < 0.6 * norms[0.0]  # measured: 0.53 (the updates themselves add norm)


def _logits(model, processor) -> torch.Tensor:
    from tinymed.models import build_prompt

    image = Image.new("RGB", (40, 40), COLORS["blue"])
    inputs = processor(text=build_prompt(processor, "Is the image blue?"), images=image, return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def test_lora_trains_adapter_and_projector_and_merges_exactly(data_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    lora = INSTRUCT.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8})
    kept = finetune(_config(data_dir, tmp_path / "kept", [ALIGN, lora], keep_adapter=True), progress=False)
    merged = finetune(_config(data_dir, tmp_path / "merged", [ALIGN, lora]), progress=False)
    files = {p.name for p in kept.model_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "LOADING.md"} <= files
    adapter_config = json.loads((kept.model_dir / "adapter_config.json").read_text())
    base = LlavaForConditionalGeneration.from_pretrained(adapter_config["base_model_name_or_path"])
    peft_model = PeftModel.from_pretrained(base, kept.model_dir).eval()
    lora_modules = [n for n, _ in peft_model.named_modules() if n.endswith("lora_A")]
    assert lora_modules and not any("vision_tower" in n or "projector" in n for n in lora_modules)
    plain = LlavaForConditionalGeneration.from_pretrained(merged.model_dir).eval()
    processor = AutoProcessor.from_pretrained(merged.model_dir)
    diff = (_logits(plain, processor) - _logits(peft_model, processor)).abs().max().item()
    assert diff < 1e-4
    changed = _changed(_weights(tmp_path / "merged" / "init"), _weights(merged.model_dir))
    assert any("multi_modal_projector" in k for k in changed) and any("language_model" in k for k in changed)
    assert not any("vision_tower" in k for k in changed)


def test_pairing_of_repeated_dataset_options():
    assert pair_datasets(["vqa-rad", "synthetic", "slake"], ["a", "b"], []) == [
        {"name": "vqa-rad", "path": "a", "split": "train"},
        {"name": "synthetic", "path": None, "split": "train"},
        {"name": "slake", "path": "b", "split": "train"},
    ]
    assert pair_datasets(["synthetic", "slake"], ["-", "b"], ["test"])[0] == {"name": "synthetic", "path": None, "split": "test"}
    with pytest.raises(Exception, match="--path"):
        pair_datasets(["vqa-rad", "slake"], ["a"], [])


@pytest.mark.slow
def _padded_tokens(order: list[int], lengths: list[int], batch: int) -> int:
    return sum(max(lengths[i] for i in order[k : k + batch]) * len(order[k : k + batch])
               for k in range(0, len(order), batch))


def test_length_grouped_epochs_visit_every_sample_once_with_less_padding():
    lengths = torch.randint(5, 60, (1003,), generator=torch.Generator().manual_seed(1)).tolist()
    plain, grouped = EpochSampler(1003, seed=3), EpochSampler(1003, seed=3, lengths=lengths, batch_size=8)
    for epoch in range(2):
        plain.set_window(0, epoch)
        grouped.set_window(0, epoch)
        assert sorted(grouped.order) == list(range(1003))
        assert _padded_tokens(grouped.order, lengths, 8) < 0.8 * _padded_tokens(plain.order, lengths, 8)
    first = list(grouped.order)
    grouped.set_window(0, 1, start=16, stop=40)  # resuming re-creates the same epoch order
    assert grouped.order == first and list(grouped) == first[16:40]
    grouped.set_window(0, 0)
    assert grouped.order != first


def test_resume_after_kill_9_matches_an_uninterrupted_run(data_dir, tmp_path):
    stages = [StageConfig(name="align", max_steps=3, lr=1e-2, batch_size=4),
              StageConfig(name="instruct", max_steps=16, lr=1e-2, batch_size=4, grad_accum=2)]
    grouped = {"save_every": 4, "group_by_length": True}  # the resumed order includes the length grouping
    reference = finetune(_config(data_dir, tmp_path / "ref", stages, **grouped), progress=False)
    config_file = tmp_path / "config.json"
    config_file.write_text(_config(data_dir, tmp_path / "unused", stages, **grouped).model_dump_json(exclude={"out_dir"}))
    out, checkpoints = tmp_path / "killed", tmp_path / "killed" / "checkpoints"
    command = [sys.executable, "-m", "tinymed.cli", "finetune", "--config", str(config_file), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (checkpoints / "step-000004").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # mid-stage 2, maybe mid-write of the next checkpoint
    proc.wait()
    assert not (out / "finetune_result.json").exists(), "the run finished before it could be killed"
    (checkpoints / ".tmp-step-999999").mkdir(exist_ok=True)  # half-written: never got its final name
    (checkpoints / "step-999998").mkdir()  # no trainer_state.json: incomplete
    (checkpoints / "step-999998" / "model.safetensors").write_bytes(b"garbage")
    done = subprocess.run([*command, "--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((out / "finetune_result.json").read_text())
    assert resumed["steps"] == reference.steps == {"align": 3, "instruct": 16}
    assert math.isclose(resumed["final_loss"], reference.final_loss, rel_tol=1e-5, abs_tol=1e-6)
    ref_w, res_w = _weights(reference.model_dir), _weights(out / "final")
    assert max((ref_w[k] - res_w[k]).abs().max().item() for k in ref_w) < 1e-5
    steps = [json.loads(line)["global_step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 20))
