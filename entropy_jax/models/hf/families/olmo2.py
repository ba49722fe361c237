"""OLMo-2 (OLMo et al. 2024, "2 OLMo 2 Furious") from Hugging Face files.

Llama-shaped (:mod:`.llama`: SwiGLU, grouped-query attention, rotary in either config dialect)
with two differences: the norms sit at the *end* of each residual branch, ``x + norm(attn(x))``
and ``x + norm(mlp(x))`` (``post_attention_layernorm``, ``post_feedforward_layernorm``; no norm
before a sublayer: ``norm_placement="sublayer_post"``), and QK-norm: an RMSNorm over the whole
query and over the whole key projection (``q_norm``, ``k_norm``, widths ``heads x head_dim`` and
``kv_heads x head_dim``), before the heads are split and before rotary. No MLP biases;
``attention_bias`` (default off) would put biases on W_Q, W_K, W_V and W_O.
"""

from __future__ import annotations

from entropy_jax.models.hf.families import llama
from entropy_jax.models.hf.families.common import TensorSource
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.transformer import ModelConfig


def config(hf: dict, tokens: int | None) -> ModelConfig:
    return llama.llama_config({**hf, "rms_norm_eps": hf.get("rms_norm_eps", 1e-5), "mlp_bias": False}, tokens,
                              qk_norm=True, norm_placement="sublayer_post")


def weights(get: TensorSource, cfg: ModelConfig) -> dict:
    return llama.weights(get, cfg, norms=("post_attention_layernorm", "post_feedforward_layernorm"))


register_family(Family(
    "olmo2", config, weights, buffers=llama.BUFFERS,
    tiny_config={"model_type": "olmo2", **llama.TINY, "rope_theta": 500.0},
))
