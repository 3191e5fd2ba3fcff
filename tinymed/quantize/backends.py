"""How each backend turns a full-precision LLaVA folder (or its own saved folder) into a quantized model."""

from __future__ import annotations

import logging
from pathlib import Path

from tinymed.models import default_dtype
from tinymed.quantize.registry import QuantConfig


def compute_dtype(config: QuantConfig, device: str):
    """The torch dtype for activations and the weights left unquantized."""
    import torch

    return default_dtype(device) if config.compute_dtype == "auto" else getattr(torch, config.compute_dtype)


def linear_names(model, prefixes: list[str]) -> list[str]:
    """Paths of the plain `nn.Linear` layers under any of `prefixes` (subclasses such as
    nn.MultiheadAttention's out_proj are left alone: their owners read `.weight` directly)."""
    import torch

    def under(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    return [n for n, m in model.named_modules() if type(m) is torch.nn.Linear and under(n)]


def bnb_config(config: QuantConfig, device: str):
    """The paper's FQ8 (LLM.int8) / FQ4 (NF4, double quantization) settings, skipping the untargeted parts."""
    from transformers import BitsAndBytesConfig

    skip = config.prefixes(selected=False)
    if config.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(config, device),
        llm_int8_skip_modules=skip,
    )


def load_bnb(path: str | Path, device: str, config: QuantConfig, prequantized: bool):
    """Quantize while loading (or reload a bitsandbytes-saved folder) with transformers' integration."""
    from transformers import LlavaForConditionalGeneration

    # On CPU, LLM.int8 casts fp32 inputs to fp16 on every matmul and logs a warning each time.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    kwargs = {} if prequantized else {"quantization_config": bnb_config(config, device)}
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), dtype=compute_dtype(config, device), device_map=device, **kwargs
    )
    return model.eval()


def load_torch_dynamic(path: str | Path, device: str, config: QuantConfig, prequantized: bool):
    """Load fp32 weights and swap the targeted linears for PyTorch dynamic int8 ones (deterministic, so a
    saved recipe re-creates exactly the same quantized weights)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic
    from transformers import LlavaForConditionalGeneration

    if compute_dtype(config, device) != torch.float32:
        raise ValueError("torch-int8 computes in float32 only; use compute_dtype 'auto' or 'float32'")
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    names = linear_names(model, config.prefixes(selected=True))
    quantize_dynamic(model, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return model
