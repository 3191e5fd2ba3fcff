"""What trains in each stage (freezing, LoRA), and how the final model is written."""

from __future__ import annotations

from pathlib import Path

from tinymed.train.config import StageConfig

ADAPTER_NOTE = """# LoRA adapter (tinymed finetune --keep-adapter)

This folder is a PEFT LoRA adapter on the language model (the projector{vision} is stored whole, as
`modules_to_save`), plus the processor with the chat template. Base model: `{base}`.

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor

base = AutoModelForImageTextToText.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{folder}")
model = model.merge_and_unload()  # optional: a plain transformers model
processor = AutoProcessor.from_pretrained("{folder}")
```

`tinymed finetune` without `--keep-adapter` writes the merged model directly.
"""


def _llava(model):
    """The inner model of a LLaVA-style `...ForConditionalGeneration` (Llava, FastVLM): its vision
    tower, projector and LM."""
    return model.model


def lora_target_pattern(model) -> str:
    """A peft `target_modules` regex matching the LM's linear layers only (never the vision tower,
    the projector or the output head)."""
    import torch

    leaves = sorted(
        {name.rsplit(".", 1)[-1] for name, m in _llava(model).language_model.named_modules()
         if isinstance(m, torch.nn.Linear)}
    )
    return rf"^model\.language_model\..*\.({'|'.join(leaves)})$"


def configure_stage(model, stage: StageConfig):
    """Set `requires_grad` and train/eval modes for `stage` (align: projector; instruct: projector + LM
    [+ vision with `train_vision`]); with `stage.lora`, return the model wrapped as a peft LoRA model.
    A frozen vision tower stays in eval mode (its batch-norm statistics, if any, must not drift)."""
    parts = _llava(model)
    model.requires_grad_(False)
    if stage.name == "instruct" and stage.lora:
        model = _with_lora(model, stage)
    else:
        parts.multi_modal_projector.requires_grad_(True)
        if stage.name == "instruct":
            parts.language_model.requires_grad_(True)
            model.lm_head.requires_grad_(True)
            parts.vision_tower.requires_grad_(stage.train_vision)
    model.train()
    if not stage.train_vision:
        parts.vision_tower.eval()
    return model


def _with_lora(model, stage: StageConfig):
    from peft import LoraConfig, get_peft_model

    modules_to_save = ["multi_modal_projector"] + (["vision_tower"] if stage.train_vision else [])
    config = LoraConfig(
        r=stage.lora_r,
        lora_alpha=stage.lora_alpha,
        lora_dropout=0.0,
        target_modules=lora_target_pattern(model),
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merged(model):
    """A plain model: LoRA weights folded in (peft's `merge_and_unload`); other models unchanged."""
    return model.merge_and_unload() if is_peft(model) else model


def save_base(model, processor, folder: Path) -> None:
    """A standard HF folder: safetensors weights + config + processor (tokenizer, chat template)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def save_adapter(model, processor, folder: Path, base: str, final_name: Path) -> None:
    """A peft adapter folder pointing at `base`, the processor, and LOADING.md saying how to load it."""
    for config in model.peft_config.values():
        config.base_model_name_or_path = base
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    vision = " and vision tower" if "vision_tower" in next(iter(model.peft_config.values())).modules_to_save else ""
    note = ADAPTER_NOTE.format(base=base, folder=final_name, vision=vision)
    (folder / "LOADING.md").write_text(note, encoding="utf-8")
