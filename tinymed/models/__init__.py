"""Models stage: LLaVA checkpoints (load, compose, the tiny preset), the prompt template, generation."""

from tinymed.models.compose import ComposeConfig, compose, compose_fastvlm, compose_llava
from tinymed.models.features import IGNORE_INDEX, encode_for_training
from tinymed.models.generate import GeneratedAnswer, generate_answers, generate_batch, prepare_inputs
from tinymed.models.loading import LoadedModel, default_dtype, load_model, load_processor, resolve_device
from tinymed.models.template import build_prompt
from tinymed.models.tiny import TinyConfig, build_tiny_model
from tinymed.models.zoo import ZOO, assemble, resolve_model

__all__ = [
    "ComposeConfig",
    "GeneratedAnswer",
    "IGNORE_INDEX",
    "LoadedModel",
    "TinyConfig",
    "ZOO",
    "assemble",
    "build_prompt",
    "build_tiny_model",
    "compose",
    "compose_fastvlm",
    "compose_llava",
    "default_dtype",
    "encode_for_training",
    "generate_answers",
    "generate_batch",
    "load_model",
    "load_processor",
    "prepare_inputs",
    "resolve_device",
    "resolve_model",
]
