"""Mistral (Jiang et al. 2023) from Hugging Face files.

Llama-shaped (:mod:`.llama`; no biases, ``num_key_value_heads`` 8 where config.json omits it,
as in transformers). ``sliding_window`` W lets a query see only the W most recent keys; it
changes nothing for sequences of at most W tokens, so the model's context (``max_len``) is
``min(max_position_embeddings, sliding_window)``: longer sequences are refused, never computed
with the wrong mask (Mistral 7B v0.1: W = 4096; v0.2 and later: null, no window).
"""

from __future__ import annotations

from entropy_jax.models.hf.families import llama
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.transformer import ModelConfig


def config(hf: dict, tokens: int | None) -> ModelConfig:
    window = hf.get("sliding_window", 4096)
    context = min(hf["max_position_embeddings"], window) if window else hf["max_position_embeddings"]
    return llama.llama_config({**hf, "attention_bias": False, "mlp_bias": False}, tokens, kv_heads_default=8,
                              max_len=context)


register_family(Family(
    "mistral", config, llama.weights, buffers=llama.BUFFERS,
    tiny_config={"model_type": "mistral", **llama.TINY, "sliding_window": 12,
                 "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_theta": 1000.0},
))
