"""Which CPU kernel computes a model's fp32 `nn.Linear` layers at inference.

- `aten`: PyTorch's default (the CPU wheel calls MKL's sgemm / sgemv).
- `onednn`: oneDNN's inner product, `torch.ops.mkldnn._linear_pointwise` — the op PyTorch's own compiler
  (inductor) lowers CPU linear layers to — on the same weight tensors: nothing is copied, tied weights stay
  tied, `state_dict` is unchanged.

Why: on the 2-core AMD EPYC VM this project runs on (2026-12-04, fp32, 2 threads), MKL multiplies the
8 rows of a batch-8 decode step by tinymed-med-270m's 262,144 × 640 LM head in 218 ms and one row in
65 ms; oneDNN takes 101 ms and 36 ms. The whole model then decodes 7.8 → 10.5 tokens/s at batch 1 and
27 → 43 tokens/s at batch 8 (`bench/serve_throughput.py` measures what that does to serving). The sums
are the same but taken in another order, so logits move by ~1e-4: a greedy answer can change only where
two tokens are that close.
"""

from __future__ import annotations

import torch

LINEAR_KERNELS = ("aten", "onednn")


# A layer at least this wide (an LM head over a vocabulary) with 2..SWAP_MAX_ROWS input rows is computed
# as (W xᵀ)ᵀ: the weight as oneDNN's input and the few rows as its weight. Measured on the 2-core AMD EPYC VM
# (2026-12-04, 262,144 × 640 head): 8 rows 71-95 → 46-53 ms, 16 rows 82-94 → 71-80 ms, 1 row and 32 rows
# no better; the 640-2048-wide layers of the same model gain nothing either way.
SWAP_MIN_OUT = 65_536
SWAP_MAX_ROWS = 16


class OneDnnLinear(torch.nn.Module):
    """`y = x Wᵀ + b` through oneDNN, holding the original layer's weight and bias parameters."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.out_features >= SWAP_MIN_OUT and 1 < rows <= SWAP_MAX_ROWS:
            flat = x.reshape(rows, self.in_features).contiguous()  # a strided one takes oneDNN 100× longer
            out = torch.ops.mkldnn._linear_pointwise(self.weight, flat, None, "none", [], "").t()
            out = out if self.bias is None else out + self.bias
            return out.contiguous().reshape(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def use_linear_kernel(model: torch.nn.Module, kernel: str) -> int:
    """Compute `model`'s fp32 CPU `nn.Linear` layers with `kernel` (one of LINEAR_KERNELS); returns how many
    layers it now computes. Quantized layers (subclasses of `nn.Linear` or other types) and half-precision
    or GPU layers are left alone. Inference only: oneDNN's op has no backward."""
    if kernel not in LINEAR_KERNELS:
        raise ValueError(f"unknown linear kernel {kernel!r}; use one of {', '.join(LINEAR_KERNELS)}")
    if kernel == "aten":
        return 0
    if not onednn_available():
        raise RuntimeError("this PyTorch build has no oneDNN (mkldnn) linear op; use --cpu-linear aten")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            if type(child) is torch.nn.Linear and weight.dtype == torch.float32 and weight.device.type == "cpu":
                setattr(parent, name, OneDnnLinear(child))
                swapped += 1
    return swapped
