"""How each backend turns a full-precision LLaVA folder (or its own saved folder) into a quantized model."""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

from tinymed.models import default_dtype
from tinymed.quantize.registry import TARGET_PREFIXES, QuantConfig


def compute_dtype(config: QuantConfig, device: str):
    """The torch dtype for activations and the weights left unquantized."""
    import torch

    return default_dtype(device) if config.compute_dtype == "auto" else getattr(torch, config.compute_dtype)


def layer_names(model, prefixes: list[str], kind=None) -> list[str]:
    """Paths of the layers of exactly type `kind` (default `nn.Linear`: subclasses such as
    nn.MultiheadAttention's out_proj are left alone, their owners read `.weight` directly) under `prefixes`."""
    import torch

    def under(name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    kind = kind or torch.nn.Linear
    return [n for n, m in model.named_modules() if type(m) is kind and under(n)]


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
    from transformers import AutoModelForImageTextToText

    # On CPU, LLM.int8 casts fp32 inputs to fp16 on every matmul and logs a warning each time.
    logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    kwargs = {} if prequantized else {"quantization_config": bnb_config(config, device)}
    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=compute_dtype(config, device), device_map=device, **kwargs
    )
    return model.eval()


def _plain_model(path: str | Path, device: str, config: QuantConfig):
    """The full-precision model in the compute dtype on `device`, and the paths of its targeted linears.

    The checkpoint is read into memory, not memory-mapped: once quantization replaces the targeted linears,
    their full-precision weights are freed. A mapping would stay resident instead (counted in RSS) for as
    long as any tensor points into it, and transformers 5.24 keeps a second, unreachable alias of every
    BatchNorm buffer it loads (measured on tinymed-med-270m: 1 GB of the file stayed mapped after
    quantizing and copying every parameter and buffer out of it)."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        str(path), dtype=compute_dtype(config, device), device_map=device, disable_mmap=True
    ).eval()
    return model, layer_names(model, config.prefixes(selected=True))


def load_torch_dynamic(path: str | Path, device: str, config: QuantConfig, prequantized: bool):
    """Load fp32 weights and swap the targeted linears for PyTorch dynamic int8 ones (deterministic, so a
    saved recipe re-creates exactly the same quantized weights)."""
    import torch
    from torch.ao.quantization import default_dynamic_qconfig, float_qparams_weight_only_qconfig, quantize_dynamic

    if compute_dtype(config, device) != torch.float32:
        raise ValueError("torch-int8 computes in float32 only; use compute_dtype 'auto' or 'float32'")
    model, names = _plain_model(path, device, config)
    spec = {name: default_dynamic_qconfig for name in names}
    if config.targets["embeddings"]:
        embeddings = layer_names(model, [TARGET_PREFIXES["embeddings"]], torch.nn.Embedding)
        spec.update({name: float_qparams_weight_only_qconfig for name in embeddings})
    with warnings.catch_warnings():
        # torch 2.13 still ships and runs eager dynamic quantization but warns, on every load, that it is
        # deprecated in favour of torchao; it stays the fastest 8-bit CPU path measured (see registry.py).
        warnings.filterwarnings("ignore", "torch.ao.quantization is deprecated", DeprecationWarning)
        warnings.filterwarnings("ignore", "torch.quantize_per_tensor, torch.quantize_per_channel", UserWarning)
        quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)
    return model


def _outside_inference_mode(forward):
    """`forward` run under no_grad instead of inference_mode: quanto's packed int4 weights dequantize into a
    view that inference mode rejects ("Cannot set version_counter for inference tensor")."""
    import torch

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return forward(*args, **kwargs)
        with torch.inference_mode(False), torch.no_grad():
            return forward(*args, **kwargs)

    return run


# Linears that quanto-int4-mixed keeps in int8: on tinymed-med-270m (teacher-forced on SLAKE validation,
# 2026-12-05, bench/int4_sensitivity.py) int8 for these 36 of 126 LM linears cut int4's KL divergence from fp32
# at the answer tokens by 59%, the most of the splits tried that keep about three quarters of the weights in int4.
MIXED_INT8_SUFFIXES = ("self_attn.v_proj", "mlp.down_proj")


def load_quanto(path: str | Path, device: str, config: QuantConfig, prequantized: bool):
    """Load full-precision weights and quantize the targeted linears' weights with optimum-quanto (int8 per
    output row; int4 in groups of up to 128 with a float scale and shift; quanto-int4-mixed: int4 but int8 for
    MIXED_INT8_SUFFIXES), frozen; activations stay in the compute dtype. Deterministic, so a saved recipe
    re-creates exactly the same quantized weights."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    model, names = _plain_model(path, device, config)
    if config.method == "quanto-int8":
        int8, int4 = names, []
    elif config.method == "quanto-int4-mixed":
        int8 = [n for n in names if n.endswith(MIXED_INT8_SUFFIXES)]
        int4 = [n for n in names if n not in int8]
    else:
        int8, int4 = [], names
    for qtype, layers in ((qint8, int8), (qint4, int4)):
        quantize(model, weights=qtype, activations=None, include=layers)  # an empty list matches no layer
    freeze(model)
    for name in int4:
        layer = model.get_submodule(name)
        layer.forward = _outside_inference_mode(layer.forward)
    return model


def load_torchao(path: str | Path, device: str, config: QuantConfig, prequantized: bool):
    """Load full-precision weights and give the targeted linears torchao int8 weight-only weights (per output
    row; activations stay in the compute dtype). Deterministic, so a saved recipe re-creates the same weights."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, names = _plain_model(path, device, config)
    targets = set(names)
    # set_inductor_config=False: leave torch.compile's global settings alone (tinymed does not compile).
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda _, fqn: fqn in targets)
    return model


def is_torch_dynamic_layer(module) -> bool:
    from torch.ao.nn.quantized import Embedding
    from torch.ao.nn.quantized.dynamic import Linear

    return isinstance(module, (Linear, Embedding))


def is_bnb_layer(module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def is_quanto_layer(module) -> bool:
    from optimum.quanto import QModuleMixin

    return isinstance(module, QModuleMixin)


def is_torchao_layer(module) -> bool:
    """torchao keeps the nn.Linear and swaps its weight for a tensor subclass."""
    from torchao.utils import TorchAOBaseTensor

    return isinstance(getattr(module, "weight", None), TorchAOBaseTensor)
