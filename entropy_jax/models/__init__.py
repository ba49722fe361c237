"""Decoder-only transformer language models and how to build them from configs."""

from entropy_jax.models.build import (
    abstract_like,
    abstract_model,
    build_model,
    init_model,
    model_config,
    register_architecture,
)
from entropy_jax.models.transformer import ModelConfig, Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "abstract_like",
    "abstract_model",
    "build_model",
    "init_model",
    "model_config",
    "register_architecture",
]
