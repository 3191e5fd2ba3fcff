"""The `tiny` preset: a small LLaVA-style model with a random-init Llama LM (tokenizer trained locally)
that trains in minutes on 2 CPU cores. Same classes and on-disk format as a real model; only sizes differ.

Two towers: a random-init SigLIP-style ViT (`LlavaForConditionalGeneration`; the default, cheapest to
build, what most tests use) or the ImageNet-pretrained EfficientNet-Lite0 (`FastVlmForConditionalGeneration`,
put together by `compose_fastvlm` exactly as the real model is; its image tokens are the last feature map,
(image_size / 32)² of 1280 channels)."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from tinymed.models.compose import VISION_LITE0, ComposeConfig, compose_fastvlm
from tinymed.models.template import chat_template
from tinymed.models.tokenizer import IMAGE, train_tokenizer


class TinyConfig(BaseModel):
    """Sizes of the tiny preset (defaults: SigLIP-style tower, ≈1M parameters, 16 image tokens)."""

    vision: Literal["siglip", "efficientnet-lite0"] = Field(
        "siglip", description="random-init SigLIP-style ViT, or the pretrained EfficientNet-Lite0 (FastVLM)")
    image_size: int = Field(64, description="input resolution in pixels (square)")
    image_width: int | None = Field(None, description="Lite0 only: input width in pixels where it differs from "
                                                      "image_size, which is then the height")
    patch_size: int = Field(16, description="SigLIP patch side (Lite0: fixed stride 32)")
    vision_hidden: int = Field(128, description="SigLIP width (Lite0: 1280 channels)")
    vision_layers: int = Field(2, description="SigLIP depth")
    text_hidden: int = 128
    text_layers: int = 2
    text_mlp_ratio: int = Field(2, description="LM MLP width ÷ text_hidden")
    heads: int = 4
    vocab_size: int = 2000
    max_positions: int = 512
    vision_feature_layer: int = Field(-1, description="which SigLIP hidden layer feeds the projector")
    image_after_question: bool = Field(False, description="prompt order: question, then image")
    tie_embeddings: bool = Field(False, description="one matrix for the LM's input embedding and output head")
    seed: int = 0

    @model_validator(mode="after")
    def _width_needs_lite0(self):
        if self.image_width is not None and self.vision != VISION_LITE0:
            raise ValueError(f"image_width={self.image_width}: a non-square input is only built for the "
                             f"{VISION_LITE0} tower (the SigLIP-style ViT's position embeddings are square)")
        return self


def build_tiny_model(texts: Iterable[str], config: TinyConfig = TinyConfig()):
    """Train a tokenizer on `texts` and build a tiny model with a random-init LM. Returns (model, processor)."""
    from transformers import LlamaConfig

    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * config.text_mlp_ratio,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=config.tie_embeddings,
    )
    build = _lite0_fastvlm if config.vision == VISION_LITE0 else _siglip_llava
    return build(tokenizer, text, config)


def _lite0_fastvlm(tokenizer, text, config: TinyConfig):
    """The pretrained Lite0 tower + a fresh projector + the random LM, composed like the real model."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="tinymed-tiny-lm-") as folder:
        LlamaForCausalLM(text).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        return compose_fastvlm(ComposeConfig(llm=folder, vision=VISION_LITE0, image_size=config.image_size,
                                             image_width=config.image_width,
                                             image_after_question=config.image_after_question, seed=config.seed))


def _siglip_llava(tokenizer, text, config: TinyConfig):
    """A random-init SigLIP-style ViT + mlp2x_gelu projector + the random LM, as a LLaVA."""
    import torch
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    llava = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(config.image_size // config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=config.vision_feature_layer,
    )
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(llava).float().eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    image_processor = SiglipImageProcessorPil(size={"height": config.image_size, "width": config.image_size})
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=config.patch_size,
        vision_feature_select_strategy="full",
        chat_template=chat_template(IMAGE, image_last=config.image_after_question),
        image_token=IMAGE,
        num_additional_image_tokens=0,
    )
    return model, processor

