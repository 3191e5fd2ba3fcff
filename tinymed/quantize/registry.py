"""The quantization backends tinymed offers (one explicit dict), what each quantizes, and where it runs.

Which backends are here was decided by measurement on a 2-core AVX2 CPU (see bench/quant_backends.py):
PyTorch dynamic int8 is the fastest 8-bit CPU path (≈1.8× fp32 decode); bitsandbytes int8/NF4 are the
paper's FQ8/FQ4 configuration, native on CUDA and slower than fp32 on CPU (kept, with that speed shown);
NF4 was the fastest 4-bit CPU backend measured (optimum-quanto int4 and hqq 4-bit were slower, torchao
int4 did not convert on CPU).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, field_validator

# Module-path prefixes of the parts of a transformers-5 LlavaForConditionalGeneration. transformers' skip
# lists match a path's start or suffix, so these full paths (not "vision_tower") are what they need.
TARGET_PREFIXES: dict[str, str] = {
    "llm": "model.language_model",
    "projector": "model.multi_modal_projector",
    "vision": "model.vision_tower",
    "lm_head": "lm_head",
}

DEFAULT_TARGETS = {"llm": True, "projector": False, "vision": False, "lm_head": False}

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]


class QuantConfig(BaseModel):
    """What to quantize and how. Embeddings are never quantized (no backend here quantizes them)."""

    method: str = Field(description="a key of BACKENDS, e.g. torch-int8, bnb-int8, bnb-nf4")
    targets: dict[str, bool] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS),
        description="which parts' linear layers to quantize: llm, projector, vision, lm_head",
    )
    compute_dtype: ComputeDtype = Field(
        "auto", description="dtype of activations / non-quantized weights; auto = float32 on CPU, bf16/fp16 on CUDA"
    )

    @field_validator("targets")
    @classmethod
    def _known_targets(cls, targets: dict[str, bool]) -> dict[str, bool]:
        unknown = set(targets) - set(TARGET_PREFIXES)
        if unknown:
            raise ValueError(f"unknown quantization targets {sorted(unknown)}; known: {sorted(TARGET_PREFIXES)}")
        if not any({**DEFAULT_TARGETS, **targets}.values()):
            raise ValueError("nothing to quantize: every target is off")
        return {**DEFAULT_TARGETS, **targets}

    def prefixes(self, selected: bool) -> list[str]:
        """Module-path prefixes of the parts that are (selected=True) or are not quantized."""
        return [TARGET_PREFIXES[part] for part, on in self.targets.items() if on == selected]


@dataclass(frozen=True)
class Backend:
    """One quantization method: the library behind it, its bit width and the devices it runs on."""

    name: str
    library: str
    bits: int
    devices: tuple[str, ...]
    serialization: Literal["backend", "recipe"]  # its own save_pretrained, or fp weights + tinymed_quant.json
    description: str
    load: Callable  # (path, device, QuantConfig, prequantized: bool) -> quantized model on `device`
    quantized_classes: Callable[[], tuple[type, ...]]  # module classes that mark a quantized layer


def _bnb_classes() -> tuple[type, ...]:
    import bitsandbytes as bnb

    return (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)


def _torch_dynamic_classes() -> tuple[type, ...]:
    from torch.ao.nn.quantized.dynamic import Linear

    return (Linear,)


def _load_bnb(*args, **kwargs):
    from tinymed.quantize.backends import load_bnb

    return load_bnb(*args, **kwargs)


def _load_torch_dynamic(*args, **kwargs):
    from tinymed.quantize.backends import load_torch_dynamic

    return load_torch_dynamic(*args, **kwargs)


BACKENDS: dict[str, Backend] = {
    "torch-int8": Backend(
        name="torch-int8", library="torch.ao.quantization.quantize_dynamic", bits=8, devices=("cpu",),
        serialization="recipe", load=_load_torch_dynamic, quantized_classes=_torch_dynamic_classes,
        description="PyTorch dynamic int8 (int8 weights per tensor, int8 activations quantized per batch); CPU only",
    ),
    "bnb-int8": Backend(
        name="bnb-int8", library="bitsandbytes", bits=8, devices=("cuda", "cpu"),
        serialization="backend", load=_load_bnb, quantized_classes=_bnb_classes,
        description="bitsandbytes LLM.int8() (paper's FQ8); native on CUDA, slower than fp32 on CPU",
    ),
    "bnb-nf4": Backend(
        name="bnb-nf4", library="bitsandbytes", bits=4, devices=("cuda", "cpu"),
        serialization="backend", load=_load_bnb, quantized_classes=_bnb_classes,
        description="bitsandbytes NF4 + double quantization (paper's FQ4); native on CUDA, runs on CPU",
    ),
}

NO_QUANT = ("none", "")


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def available_methods(device: str) -> list[str]:
    """Methods that run on `device` ('cpu' or 'cuda[:n]')."""
    return [name for name, b in BACKENDS.items() if device_kind(device) in b.devices]


def get_backend(method: str, device: str) -> Backend:
    """The backend for `method` on `device`; a clear error listing what is available otherwise."""
    backend = BACKENDS.get(method)
    if backend is None:
        raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(BACKENDS)}")
    if device_kind(device) not in backend.devices:
        raise ValueError(
            f"quantization method {method!r} needs {' or '.join(backend.devices)}, not {device!r}; "
            f"available on {device_kind(device)}: {', '.join(available_methods(device))}"
        )
    return backend


def default_demo_methods(device: str = "auto") -> list[str]:
    """The FQ8 and FQ4 variants: the fastest measured 8-bit and 4-bit backends for the device."""
    from tinymed.models import resolve_device

    return ["bnb-int8", "bnb-nf4"] if device_kind(resolve_device(device)) == "cuda" else ["torch-int8", "bnb-nf4"]
