"""The quantization backends tinymed offers (one explicit dict), what each quantizes, and where it runs.

Chosen by measurement on a 2-core AVX2 CPU (bench/quant_backends.py; decode speed vs fp32 in the same
process), the slower ones kept with their speed and accuracy shown rather than hidden. On tinymed-med-270m
(Gemma-3-270M + EfficientNet-Lite0, 2026-12-03; fp32 8.4 tokens/s, plain bf16 2.06×):
- quanto-int8 / quanto-int4 (optimum-quanto, weights only): 1.76× / 1.86× at compute_dtype bfloat16 (a
  packed int4 kernel); at float32 they dequantize on every call (0.71× / 0.53×). The CPU default pair.
- torchao-int8 (torchao int8 weight-only): 1.55× at bfloat16, 0.88× at float32.
- quanto-int4-mixed: quanto-int4 with the attention value and MLP down projections in int8. On
  tinymed-med-270m's 4-epoch weights (2026-12-05, AVX512-BF16 Xeon, bf16): 0.91× quanto-int4's decode speed,
  +12 MiB; VQA-RAD closed 75.00 vs 72.79 (fp32 76.47), SLAKE 79.33 vs 79.09 (fp32 81.73).
- bnb-int8 / bnb-nf4 (bitsandbytes): the paper's FQ8/FQ4, native on CUDA; 0.7-0.8× fp32 on this CPU (an
  earlier VM of the same kind measured 0.9-1.1× / 1.8-2.2× on a random 100M model: their CPU kernels vary
  most between hosts).
- torch-int8 (PyTorch dynamic int8: int8 weights AND int8 activations, one scale per tensor): 1.08× here
  (≈2× on the random 100M model, whose small LM head does not dominate). It breaks Gemma-3: the inputs of
  its MLP down-projections reach |x| ≈ 1300 while most values are small, so one activation scale per tensor
  rounds them away (next-token agreement with fp32 31% on 48 VQA-RAD questions, against 100% for
  quanto-int8; VQA-RAD closed accuracy 37.9 vs 73.9). Use it only on models it is checked on.
quanto and torchao are optional (`pip install 'tinymed[extra-backends]'`): a backend whose library is not
installed is not offered. torchao int4 is absent: with torchao 0.18 on CPU its default format needs the
`mslk` package and its plain_int32 format does not support CPU (re-checked 2026-12-02).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

# Module-path prefixes of the parts of a transformers-5 LlavaForConditionalGeneration. transformers' skip
# lists match a path's start or suffix, so these full paths (not "vision_tower") are what they need.
TARGET_PREFIXES: dict[str, str] = {
    "llm": "model.language_model",
    "projector": "model.multi_modal_projector",
    "vision": "model.vision_tower",
    "lm_head": "lm_head",
    "embeddings": "model.language_model.embed_tokens",  # the LLM's token embedding (not a linear layer)
}

DEFAULT_TARGETS = {"llm": True, "projector": False, "vision": False, "lm_head": False, "embeddings": False}

ComputeDtype = Literal["auto", "float32", "float16", "bfloat16"]


class QuantConfig(BaseModel):
    """What to quantize and how: the linear layers of the targeted parts, and the LLM's token embedding
    when `embeddings` is on (backends with `quantizes_embeddings` only)."""

    method: str = Field(description="a key of BACKENDS, e.g. torch-int8, bnb-nf4, quanto-int4")
    targets: dict[str, bool] = Field(
        default_factory=lambda: dict(DEFAULT_TARGETS),
        description="which parts to quantize: the linears of llm, projector, vision, lm_head; the LLM's embeddings",
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

    @classmethod
    def from_spec(cls, spec: str) -> QuantConfig:
        """`method` or `method:compute_dtype` (e.g. `quanto-int4-mixed:bfloat16`), as `tinymed benchmark --quant`
        takes it; default targets."""
        method, _, dtype = spec.partition(":")
        return cls(method=method, compute_dtype=dtype or "auto")

    def prefixes(self, selected: bool) -> list[str]:
        """Module-path prefixes of the parts that are (selected=True) or are not quantized."""
        return [TARGET_PREFIXES[part] for part, on in self.targets.items() if on == selected]


@dataclass(frozen=True)
class Backend:
    """One quantization method: the library behind it, its bit width and the devices it runs on."""

    name: str
    library: str  # the pip distribution behind it
    module: str  # what must be importable for the backend to be available
    bits: int
    devices: tuple[str, ...]
    serialization: Literal["backend", "recipe"]  # its own save_pretrained, or fp weights + tinymed_quant.json
    description: str
    load: Callable  # (path, device, QuantConfig, prequantized: bool) -> quantized model on `device`
    is_quantized: Callable[[Any], bool]  # module -> whether this backend quantized it
    extra: str | None = None  # the tinymed extra that installs `library`; None: a core dependency
    quantizes_embeddings: bool = False  # whether the `embeddings` target is supported

    @property
    def installed(self) -> bool:
        try:
            return importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:  # a missing parent package (e.g. `optimum` for optimum.quanto)
            return False

    @property
    def pip_install(self) -> str:
        return f"pip install 'tinymed[{self.extra}]'" if self.extra else f"pip install {self.library}"


def _lazy(name: str) -> Callable:
    """`tinymed.quantize.backends.<name>`, imported at the first call (backends imports this module)."""

    def call(*args, **kwargs):
        from tinymed.quantize import backends

        return getattr(backends, name)(*args, **kwargs)

    return call


_EXTRA = "extra-backends"

BACKENDS: dict[str, Backend] = {
    "torch-int8": Backend(
        name="torch-int8", library="torch", module="torch", bits=8, devices=("cpu",),
        serialization="recipe", load=_lazy("load_torch_dynamic"), is_quantized=_lazy("is_torch_dynamic_layer"),
        quantizes_embeddings=True,
        description="PyTorch dynamic int8 (int8 weights per tensor, int8 activations quantized per batch; "
        "embeddings: uint8 per row with float scale and offset); CPU only; breaks models with activation "
        "outliers (Gemma-3)",
    ),
    "bnb-int8": Backend(
        name="bnb-int8", library="bitsandbytes", module="bitsandbytes", bits=8, devices=("cuda", "cpu"),
        serialization="backend", load=_lazy("load_bnb"), is_quantized=_lazy("is_bnb_layer"),
        description="bitsandbytes LLM.int8() (paper's FQ8); native on CUDA, 0.5-1.1× fp32 speed on CPU (by host)",
    ),
    "bnb-nf4": Backend(
        name="bnb-nf4", library="bitsandbytes", module="bitsandbytes", bits=4, devices=("cuda", "cpu"),
        serialization="backend", load=_lazy("load_bnb"), is_quantized=_lazy("is_bnb_layer"),
        description="bitsandbytes NF4 + double quantization (paper's FQ4); native on CUDA, runs on CPU",
    ),
    "quanto-int8": Backend(
        name="quanto-int8", library="optimum-quanto", module="optimum.quanto", bits=8, devices=("cuda", "cpu"),
        serialization="recipe", load=_lazy("load_quanto"), is_quantized=_lazy("is_quanto_layer"), extra=_EXTRA,
        description="optimum-quanto int8 weights (per row), activations unquantized",
    ),
    "quanto-int4": Backend(
        name="quanto-int4", library="optimum-quanto", module="optimum.quanto", bits=4, devices=("cuda", "cpu"),
        serialization="recipe", load=_lazy("load_quanto"), is_quantized=_lazy("is_quanto_layer"), extra=_EXTRA,
        description="optimum-quanto int4 weights (groups of up to 128, float scale and shift), activations "
        "unquantized; fast on CPU with compute_dtype bfloat16 (packed int4 kernel), slow at float32",
    ),
    "quanto-int4-mixed": Backend(
        name="quanto-int4-mixed", library="optimum-quanto", module="optimum.quanto", bits=4, devices=("cuda", "cpu"),
        serialization="recipe", load=_lazy("load_quanto"), is_quantized=_lazy("is_quanto_layer"), extra=_EXTRA,
        description="quanto-int4, but the attention value and MLP down projections (the layers whose int4 error "
        "costs most) in int8, as llama.cpp's Q4_K_M keeps them at 6 bits",
    ),
    "torchao-int8": Backend(
        name="torchao-int8", library="torchao", module="torchao", bits=8, devices=("cuda", "cpu"),
        serialization="recipe", load=_lazy("load_torchao"), is_quantized=_lazy("is_torchao_layer"), extra=_EXTRA,
        description="torchao int8 weight-only (per row), activations unquantized",
    ),
}

NO_QUANT = ("none", "")
# The most a quantized layer may weigh, as a fraction of the same layer in fp32, per bit width (scales and
# zero points included): tinymed's acceptance targets for FQ8 / FQ4, checked in every report.
LAYER_SIZE_TARGETS = {8: 0.30, 4: 0.20}


def device_kind(device: str) -> str:
    return "cuda" if device.startswith("cuda") else "cpu"


def available_methods(device: str) -> list[str]:
    """Methods that run on `device` ('cpu' or 'cuda[:n]') and whose library is installed."""
    return [name for name, b in BACKENDS.items() if device_kind(device) in b.devices and b.installed]


def get_backend(method: str, device: str) -> Backend:
    """The backend for `method` on `device`; a clear error listing what is available otherwise."""
    backend = BACKENDS.get(method)
    if backend is None:
        raise ValueError(f"unknown quantization method {method!r}; known: {', '.join(BACKENDS)}")
    if not backend.installed:
        raise ValueError(
            f"quantization method {method!r} needs {backend.library}, not installed: {backend.pip_install}"
        )
    if device_kind(device) not in backend.devices:
        raise ValueError(
            f"quantization method {method!r} needs {' or '.join(backend.devices)}, not {device!r}; "
            f"available on {device_kind(device)}: {', '.join(available_methods(device))}"
        )
    return backend


def check_targets(config: QuantConfig, backend: Backend) -> None:
    """A clear error when `config` asks `backend` for something it cannot quantize."""
    if config.targets.get("embeddings") and not backend.quantizes_embeddings:
        able = [name for name, b in BACKENDS.items() if b.quantizes_embeddings]
        raise ValueError(f"{backend.name} does not quantize embeddings; methods that do: {', '.join(able)}")


def default_demo_quant(device: str = "auto") -> list[QuantConfig]:
    """The FQ8 and FQ4 variants: the paper's bitsandbytes pair on CUDA. On CPU, weight-only optimum-quanto
    int8 and int4 computing in bfloat16 where optimum-quanto is installed (the fastest accurate pair measured
    on tinymed-med-270m, bench/quant_backends.py), else bitsandbytes. Not torch-int8: its per-tensor int8
    activations break models with activation outliers such as Gemma-3 (see the module docstring)."""
    from tinymed.models import resolve_device

    if device_kind(resolve_device(device)) == "cuda" or not BACKENDS["quanto-int4"].installed:
        return [QuantConfig(method="bnb-int8"), QuantConfig(method="bnb-nf4")]
    return [QuantConfig(method=m, compute_dtype="bfloat16") for m in ("quanto-int8", "quanto-int4")]
