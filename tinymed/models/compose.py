"""Compose a new LLaVA the TinyLLaVA way: a pretrained causal LM + a pretrained SigLIP/CLIP vision
encoder (Hub ids or local folders) + a fresh mlp2x_gelu projector (Linear → GELU → Linear)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from tinymed.models.template import TINYMED_CHAT_TEMPLATE
from tinymed.models.tokenizer import IMAGE


class ComposeConfig(BaseModel):
    llm: str = Field(description="causal LM: Hub id or folder (e.g. TinyLlama/TinyLlama-1.1B-Chat-v1.0)")
    vision: str = Field(description="SigLIP or CLIP model: Hub id or folder (e.g. google/siglip-so400m-patch14-384)")
    vision_feature_layer: int = Field(-2, description="vision hidden layer that feeds the projector")
    vision_feature_select_strategy: Literal["default", "full"] | None = Field(
        None, description="'default' drops CLS (CLIP), 'full' keeps all patches (SigLIP); None = by tower type"
    )
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
        chat_template=TINYMED_CHAT_TEMPLATE,
        image_token=IMAGE,
        num_additional_image_tokens=1 if kind == "clip" else 0,
    )
    return model.eval(), processor
