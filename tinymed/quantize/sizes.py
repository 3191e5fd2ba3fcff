"""Static memory of a model: the bytes its weights and buffers occupy, quantization metadata included.

Counted per tensor: plain tensors as numel × element size; PyTorch quantized tensors as their integer
data plus scales and zero points; tensor subclasses that expose `__tensor_flatten__` as the sum of their
inner tensors, recursively (torchao `Int8Tensor`: int8 data, scale, zero point; optimum-quanto
`WeightQBytesTensor`: int8 data, scale; `WeightQBitsTensor`: a `PackedTensor` of two 4-bit values per
uint8, scale, shift); bitsandbytes `Params4bit` / `Int8Params` as the packed data plus their
quantization state (absmax, code, nested absmax, offset / per-row SCB); PyTorch dynamic-int8 linears
through their packed (weight, bias), quantized embeddings through their packed weight. Shared tensors are
counted once.
"""

from __future__ import annotations

_QSTATE_TENSORS = ("absmax", "code", "offset")


def _plain_bytes(t) -> int:
    return t.numel() * t.element_size()


def _quantized_bytes(t) -> int:
    """int data + scales + zero points of a PyTorch quantized tensor (scales are float64, zero points int64)."""
    import torch

    data = t.numel() * t.element_size()
    if t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric, torch.per_channel_affine_float_qparams):
        return data + _plain_bytes(t.q_per_channel_scales()) + _plain_bytes(t.q_per_channel_zero_points())
    return data + 8 + 8


def _quant_state_bytes(state) -> int:
    """Bytes of a bitsandbytes QuantState (and its nested state with double quantization)."""
    if state is None:
        return 0
    own = sum(_plain_bytes(getattr(state, n)) for n in _QSTATE_TENSORS if getattr(state, n, None) is not None)
    return own + _quant_state_bytes(getattr(state, "state2", None))


def tensor_bytes(t) -> int:
    """Bytes one (possibly quantized or packed) tensor occupies, quantization metadata included."""
    import torch

    if t is None:
        return 0
    if t.is_quantized:
        return _quantized_bytes(t)
    if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # also when wrapped as a Parameter: its type stays the subclass
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    extra = _quant_state_bytes(getattr(t, "quant_state", None))  # bnb Params4bit
    scb = getattr(t, "SCB", None)  # bnb Int8Params: per-row scales
    return _plain_bytes(t) + extra + (_plain_bytes(scb) if scb is not None else 0)


def _module_tensors(module):
    """The tensors a module holds directly: parameters, buffers, and PyTorch-quantized packed weights."""
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    from torch.ao.nn.quantized.modules.embedding_ops import EmbeddingPackedParams
    from torch.ao.nn.quantized.modules.linear import LinearPackedParams

    if isinstance(module, LinearPackedParams):  # dynamic-int8 linears keep (weight, bias) packed here
        yield from module._weight_bias()
    if isinstance(module, EmbeddingPackedParams):  # quantized embeddings keep their weight packed here
        yield module._weight()


def module_bytes(module) -> int:
    """Static bytes of `module` and everything under it, each tensor counted once."""
    seen: dict[int, object] = {}  # id → tensor, kept alive so ids of temporaries are not reused
    for sub in module.modules():
        for t in _module_tensors(sub):
            if t is not None:
                seen.setdefault(id(t), t)
    return sum(tensor_bytes(t) for t in seen.values())


def modules_bytes(model, names: list[str]) -> int:
    """Static bytes of the named submodules of `model`, summed."""
    return sum(module_bytes(model.get_submodule(name)) for name in names)


def fp32_linear_bytes(model, names: list[str]) -> int:
    """Bytes the named linear layers take in float32 (weight + bias), whatever format they hold now."""
    total = 0
    for name in names:
        layer = model.get_submodule(name)
        bias = layer.bias() if callable(getattr(layer, "bias", None)) else getattr(layer, "bias", None)
        total += 4 * (layer.in_features * layer.out_features + (layer.out_features if bias is not None else 0))
    return total
