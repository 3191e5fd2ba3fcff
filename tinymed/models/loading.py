"""Load any LLaVA-style checkpoint (Llava or FastVLM; local folder or Hub id) with its processor, on CPU or CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tinymed.models.zoo import resolve_model


# What computes the fp32 CPU linear layers (tinymed.models.kernels); auto: onednn where it applies.
LinearKernelChoice = Literal["aten", "onednn", "auto"]


@dataclass
class LoadedModel:
    """A model ready for inference: the HF model, its processor, where it runs, and what it is."""

    model: object  # a LLaVA-style transformers model (Llava, FastVLM), possibly quantized
    processor: object  # transformers.LlavaProcessor (or compatible), with the chat template
    device: str
    name: str
    quant: str = "none"
    engine: str = "transformers"  # a key of tinymed.models.generate.ENGINES
    linear_kernel: str = "aten"  # what computes the fp32 CPU linear layers (tinymed.models.kernels)

    @property
    def tokenizer(self):
        return self.processor.tokenizer


def resolve_device(device: str = "auto") -> str:
    """'auto' → 'cuda' when a GPU is visible, else 'cpu'; 'cuda' without a GPU is a clear error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or auto")
    return device


def default_dtype(device: str):
    """float32 on CPU (no half-precision op may reach a CPU kernel); bf16 on GPUs that have it, else fp16."""
    import torch

    if device == "cpu":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_processor(path_or_id: str | Path):
    """The checkpoint's processor (folder, Hub id or zoo name), with left padding for batched generation."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(resolve_model(path_or_id))
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def load_model(path_or_id: str | Path, device: str = "auto", dtype=None, **from_pretrained_kwargs) -> LoadedModel:
    """Load a LLaVA-style image-text model (`AutoModelForImageTextToText`: Llava, FastVLM) + processor
    from a folder or a Hub id, in eval mode.

    Extra keyword arguments go to `from_pretrained` (e.g. `quantization_config`). An edge folder
    (`tinymed export gguf`) loads into the llama.cpp engine (CPU)."""
    from transformers import AutoModelForImageTextToText

    from tinymed.models.llamacpp import is_edge_folder, load_edge

    source = resolve_model(path_or_id)
    if is_edge_folder(source):
        if device.startswith("cuda") or from_pretrained_kwargs:
            raise ValueError(f"{source} is a llama.cpp edge folder: it answers on the CPU, as exported")
        return load_edge(source)
    device = resolve_device(device)
    if not Path(source).exists() and source.count("/") != 1:
        raise FileNotFoundError(f"model not found: {source} is neither a local folder nor a Hub id (owner/name)")
    model = AutoModelForImageTextToText.from_pretrained(
        source, dtype=dtype or default_dtype(device), **from_pretrained_kwargs
    )
    if "quantization_config" not in from_pretrained_kwargs:
        model.to(device)
    model.eval()
    return LoadedModel(model=model, processor=load_processor(source), device=device, name=Path(source).name or source)
