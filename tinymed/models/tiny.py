"""The `tiny` preset: a randomly initialised LLaVA (SigLIP-style tower + mlp2x_gelu + Llama) that trains
in minutes on 2 CPU cores. Same classes and on-disk format as a real model; only sizes differ."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, Field

from tinymed.models.template import TINYMED_CHAT_TEMPLATE
from tinymed.models.tokenizer import IMAGE, train_tokenizer


class TinyConfig(BaseModel):
    """Sizes of the tiny preset (defaults ≈ 1M parameters; 16 image tokens).

    Chosen by measurement (2026-11-28, 2 CPU cores, default synthetic set): from scratch, a 2-layer,
    128-wide LM with 16 image tokens learns to read the image within the demo's time budget; a
    4-layer, 256-wide LM with 64 image tokens only learned the question-only prior in the same time."""

    image_size: int = Field(64, description="input resolution in pixels (square)")
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 128
    text_layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    max_positions: int = 512
    vision_feature_layer: int = Field(-1, description="which vision hidden layer feeds the projector")
    seed: int = 0


def build_tiny_model(texts: Iterable[str], config: TinyConfig = TinyConfig()):
    """Train a tokenizer on `texts` and build a random-init tiny LLaVA. Returns (model, processor)."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = train_tokenizer(texts, vocab_size=config.vocab_size)
    vision = SiglipVisionConfig(
        hidden_size=config.vision_hidden,
        intermediate_size=config.vision_hidden * 2,
        num_hidden_layers=config.vision_layers,
        num_attention_heads=config.heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.text_hidden,
        intermediate_size=config.text_hidden * 2,
        num_hidden_layers=config.text_layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
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
        chat_template=TINYMED_CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=0,
    )
    return model, processor
