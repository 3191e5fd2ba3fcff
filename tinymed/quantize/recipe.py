"""Quantize a checkpoint into a folder that reloads, and the one loader evaluate/profile/serve call.

A quantized folder holds the processor, the weights (the backend's own `save_pretrained` format, or
the full-precision weights when the backend has none and re-quantizes deterministically on load) and
`tinymed_quant.json`, the recipe: method, targets, compute dtype, serialization, quantized modules and
their sizes.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

from pydantic import BaseModel, Field

from tinymed.io import write_json_atomic
from tinymed.models import LoadedModel, load_model, load_processor, resolve_device, resolve_model
from tinymed.models.llamacpp import is_edge_folder, read_manifest
from tinymed.quantize.registry import NO_QUANT, QuantConfig, check_targets, get_backend
from tinymed.quantize.sizes import module_bytes, modules_bytes

RECIPE_FILE = "tinymed_quant.json"


class QuantResult(BaseModel):
    """What `quantize_model` wrote and measured (bytes of weights + buffers + quantization metadata)."""

    out_dir: Path
    method: str
    config: QuantConfig
    serialization: str = Field(description="'backend' (its own format) or 'recipe' (fp weights re-quantized on load)")
    quantized_modules: list[str]
    static_bytes_before: int = Field(description="whole model, float32")
    static_bytes_after: int = Field(description="whole model, quantized")
    quantized_layer_bytes_fp32: int = Field(description="the quantized modules, in float32")
    quantized_layer_bytes_after: int = Field(description="the same modules quantized (weights, scales, zero points)")
    versions: dict[str, str] = Field(default_factory=dict)

    @property
    def quantized_layer_ratio(self) -> float:
        return self.quantized_layer_bytes_after / self.quantized_layer_bytes_fp32


def read_recipe(path: str | Path) -> QuantResult | None:
    """The recipe of a tinymed-quantized folder, or None for anything else (plain folder, Hub id)."""
    file = Path(path) / RECIPE_FILE
    if not file.is_file():
        return None
    try:
        return QuantResult.model_validate({**json.loads(file.read_text(encoding="utf-8")), "out_dir": Path(path)})
    except ValueError as exc:
        raise ValueError(f"{file}: not a valid tinymed quantization recipe ({exc})") from None


def quantized_module_names(model, backend) -> list[str]:
    """Paths of the modules the backend actually replaced with quantized ones."""
    return [name for name, m in model.named_modules() if backend.is_quantized(m)]


def _versions(backend) -> dict[str, str]:
    from importlib.metadata import version

    return {lib: version(lib) for lib in dict.fromkeys(["torch", "transformers", backend.library])}


def quantize_model(path: str | Path, config: QuantConfig, out_dir: str | Path, device: str = "auto") -> QuantResult:
    """Quantize the checkpoint at `path` with `config` on `device` into `out_dir` (a folder that
    `load_for_inference` reloads). Sizes are measured against the same checkpoint loaded in float32."""
    import torch

    device = resolve_device(device)
    backend = get_backend(config.method, device)
    check_targets(config, backend)
    out_dir = Path(out_dir)
    path = resolve_model(path)
    full = load_model(path, device="cpu", dtype=torch.float32).model
    quantized = backend.load(path, device, config, prequantized=False)
    names = quantized_module_names(quantized, backend)
    if not names:
        raise ValueError(f"{config.method}: no layer was quantized for targets {config.targets}")
    result = QuantResult(
        out_dir=out_dir, method=config.method, config=config, serialization=backend.serialization,
        quantized_modules=names,
        static_bytes_before=module_bytes(full), static_bytes_after=module_bytes(quantized),
        quantized_layer_bytes_fp32=modules_bytes(full, names),
        quantized_layer_bytes_after=modules_bytes(quantized, names),
        versions=_versions(backend),
    )
    (full if backend.serialization == "recipe" else quantized).save_pretrained(out_dir)
    load_processor(path).save_pretrained(out_dir)
    write_json_atomic(out_dir / RECIPE_FILE, result.model_dump(mode="json", exclude={"out_dir"}))
    return result


def load_for_inference(
    path_or_id: str | Path, device: str = "auto", quant: str | QuantConfig | None = None,
    linear_kernel: str = "aten",
) -> LoadedModel:
    """Load a plain checkpoint, a tinymed-quantized folder (its recipe decides), or a plain checkpoint
    quantized on the fly with `quant` (a method name, or a full QuantConfig). `LoadedModel.quant` names
    the method ('none' if none). `linear_kernel` computes the fp32 CPU linear layers left (aten, onednn, or
    auto: onednn where it applies — transformers on the CPU — else aten; `tinymed.models.kernels`)."""
    from tinymed.models.kernels import LINEAR_KERNELS, use_linear_kernel  # imports torch

    if linear_kernel not in (*LINEAR_KERNELS, "auto"):
        raise ValueError(f"unknown linear kernel {linear_kernel!r}; use auto, {', '.join(LINEAR_KERNELS)}")
    lm = _load(resolve_model(path_or_id), device, quant)
    kernel = resolve_linear_kernel(linear_kernel, lm)
    use_linear_kernel(lm.model, kernel)
    lm.linear_kernel = kernel
    return lm


def resolve_linear_kernel(kernel: str, lm: LoadedModel) -> str:
    """'auto' → 'onednn' for a transformers model on the CPU (where this PyTorch has it), else 'aten';
    'onednn' anywhere else is a clear error."""
    from tinymed.models.kernels import onednn_available

    applies = lm.engine == "transformers" and lm.device == "cpu"
    if kernel == "auto":
        return "onednn" if applies and onednn_available() else "aten"
    if kernel == "onednn" and not applies:
        raise ValueError(f"the oneDNN linear kernel is for transformers models on the CPU, not {lm.engine} on "
                         f"{lm.device}; use --cpu-linear aten")
    return kernel


def _load(path_or_id: str, device: str, quant: str | QuantConfig | None) -> LoadedModel:
    if isinstance(quant, str):
        quant = None if quant in NO_QUANT else QuantConfig(method=quant)
    if is_edge_folder(path_or_id):
        if quant:
            raise ValueError(f"{path_or_id} is a llama.cpp edge folder, quantized when exported "
                             f"({read_manifest(path_or_id)['quant']}); cannot apply {quant.method!r} on top")
        return load_model(path_or_id, device=device)
    device = resolve_device(device)
    recipe = read_recipe(path_or_id) if Path(str(path_or_id)).is_dir() else None
    if recipe and quant and quant.method != recipe.method:
        raise ValueError(
            f"{path_or_id} is already quantized with {recipe.method!r}; cannot apply {quant.method!r} on top"
        )
    if recipe is None and quant is None:
        return load_model(path_or_id, device=device)
    config = recipe.config if recipe else quant
    backend = get_backend(config.method, device)
    check_targets(config, backend)
    prequantized = recipe is not None and recipe.serialization == "backend"
    model = backend.load(path_or_id, device, config, prequantized=prequantized)
    gc.collect()  # the replaced full-precision layers can sit in reference cycles: free them now
    name = Path(str(path_or_id)).name or str(path_or_id)
    return LoadedModel(model=model, processor=load_processor(path_or_id), device=device, name=name, quant=config.method)
