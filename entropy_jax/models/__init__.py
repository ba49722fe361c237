"""Decoder-only transformer language models."""

from entropy_jax.models.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer"]
