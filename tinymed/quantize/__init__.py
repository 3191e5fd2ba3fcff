"""Quantize stage: a registry of backends (bitsandbytes int8/NF4, PyTorch dynamic int8, and, when the
`extra-backends` libraries are installed, optimum-quanto int8/int4 and torchao int8), a saved form that
reloads, static-memory accounting, and the one loader later stages call (`load_for_inference`)."""

from tinymed.quantize.recipe import (
    RECIPE_FILE,
    QuantResult,
    load_for_inference,
    quantize_model,
    quantized_module_names,
    read_recipe,
)
from tinymed.quantize.registry import (
    BACKENDS,
    DEFAULT_TARGETS,
    LAYER_SIZE_TARGETS,
    Backend,
    QuantConfig,
    available_methods,
    default_demo_quant,
    get_backend,
)
from tinymed.quantize.sizes import fp32_linear_bytes, module_bytes, modules_bytes, tensor_bytes

__all__ = [
    "BACKENDS",
    "DEFAULT_TARGETS",
    "LAYER_SIZE_TARGETS",
    "RECIPE_FILE",
    "Backend",
    "QuantConfig",
    "QuantResult",
    "available_methods",
    "default_demo_quant",
    "fp32_linear_bytes",
    "get_backend",
    "load_for_inference",
    "module_bytes",
    "modules_bytes",
    "quantize_model",
    "quantized_module_names",
    "read_recipe",
    "tensor_bytes",
]
