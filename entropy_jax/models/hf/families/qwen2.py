"""Qwen2 / Qwen2.5 (Yang et al. 2024) from Hugging Face files.

Llama-shaped (:mod:`.llama`) with biases on the query, key and value projections but none on the
output projection or the MLP (``attention_out_bias=False``); the small sizes tie the embeddings.
``num_key_value_heads`` defaults to 32 where config.json omits it, as in transformers. Sliding
-window attention (``use_sliding_window``, or a ``sliding_attention`` entry in ``layer_types``) is
refused: every layer attends over the whole causal prefix.
"""

from __future__ import annotations

from entropy_jax.models.hf.families import llama
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig


def config(hf: dict, tokens: int | None) -> ModelConfig:
    if hf.get("use_sliding_window") or "sliding_attention" in (hf.get("layer_types") or ()):
        raise HFImportError("use_sliding_window=True (sliding-window attention) is not supported for qwen2 "
                            "(only full causal attention: use_sliding_window=false)")
    return llama.llama_config({**hf, "attention_bias": True, "mlp_bias": False}, tokens, kv_heads_default=32,
                              attention_out_bias=False)


register_family(Family(
    "qwen2", config, llama.weights, buffers=llama.BUFFERS,
    tiny_config={"model_type": "qwen2", **llama.TINY, "tie_word_embeddings": True},
))
