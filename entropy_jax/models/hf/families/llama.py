"""Llama 2, 3, 3.1, 3.2 (Touvron et al. 2023; Meta 2024) from Hugging Face files, and the
Llama-shaped pieces OLMo-2, Qwen2 and Mistral share (:func:`llama_config`, :func:`rope`,
:func:`block`).

Forward switches: RMSNorm before each sublayer, rotary positions on the whole head, the SwiGLU
MLP (``gate_proj``, ``up_proj``, ``down_proj``; ``hidden_act`` silu), grouped-query attention
(``num_key_value_heads``), an explicit ``head_dim`` where config.json gives one,
``attention_bias`` (W_Q, W_K, W_V and W_O) and ``mlp_bias``, untied embeddings unless
``tie_word_embeddings``.

Rotary scaling (``rope_type``): ``default``; ``linear`` (frequencies / factor); ``llama3``
(Llama 3.1's banded scaling: ``factor``, ``low_freq_factor``, ``high_freq_factor``,
``original_max_position_embeddings``); ``dynamic`` (NTK) changes the frequencies only for
sequences longer than ``max_position_embeddings``, which the model refuses, so it computes what
``default`` computes. Others (yarn, longrope, ...) are refused.

config.json comes in two dialects: transformers 5 writes ``rope_parameters = {rope_type,
rope_theta, ...}``; most Hub files carry a top-level ``rope_theta`` and ``rope_scaling = {type
or rope_type, factor, ...}`` (or null). Both are read.

Layout: ``nn.Linear`` weights are ``[out, in]`` (transposed into NNX's ``[in, out]``); q, k, v
are separate projections of ``heads x head_dim`` and ``kv_heads x head_dim`` rows (head-major),
names under ``model.`` with the head ``lm_head.weight``; older files store
``rotary_emb.inv_freq`` (ignored).
"""

from __future__ import annotations

from typing import Any

from entropy_jax.models.hf.families.common import TensorSource, dense, head, vocab, vocab_padding
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

SWITCHES = dict(positions="rope", norm="rmsnorm", activation="swiglu")
BUFFERS = ("rotary_emb.inv_freq",)


def rope(hf: dict) -> dict[str, Any]:
    """The ModelConfig rotary fields of either config dialect; what is not implemented is refused."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise HFImportError(f"rope_parameters per layer type ({sorted(params)}) are not supported (only one rope)")
    kind = params.get("rope_type", params.get("type", "default"))
    fraction = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if fraction != 1.0:
        raise HFImportError(f"partial_rotary_factor={fraction} is not supported for {hf['model_type']} (only 1.0)")
    out = {"rotary_base": float(params.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
    if kind in ("default", "dynamic"):  # dynamic equals default up to max_position_embeddings (= max_len)
        return out
    if kind == "linear":
        return {**out, "rope_scaling": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {**out, "rope_scaling": "llama3", "rope_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_len": int(params.get("original_max_position_embeddings",
                                                        hf["max_position_embeddings"]))}
    raise HFImportError(f"rope_type={kind!r} is not supported; supported: default, dynamic, linear, llama3")


def llama_config(hf: dict, tokens: int | None, kv_heads_default: int | None = None, **switches) -> ModelConfig:
    """The ModelConfig of a Llama-shaped config.json; ``switches`` override the family's defaults.
    ``kv_heads_default``: num_key_value_heads where config.json omits it (default num_attention_heads)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HFImportError(f"hidden_act={act!r} is not supported for {hf['model_type']} (only 'silu': SwiGLU)")
    heads = hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or kv_heads_default or heads
    fields = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
        d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"],
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        vocab_padding=vocab_padding(hf["vocab_size"], tokens), num_kv_heads=kv if kv != heads else 0,
        head_dim=hf.get("head_dim") or 0, attention_bias=bool(hf.get("attention_bias", False)),
        mlp_bias=bool(hf.get("mlp_bias", False)), **SWITCHES, **rope(hf),
    )
    return ModelConfig(**{**fields, **switches})


def config(hf: dict, tokens: int | None) -> ModelConfig:
    if (hf.get("pretraining_tp") or 1) != 1:
        raise HFImportError(f"pretraining_tp={hf['pretraining_tp']} is not supported (only 1)")
    return llama_config(hf, tokens)


def rms(get: TensorSource, name: str, d: int) -> dict:
    return {"scale": get(f"{name}.weight", (d,))}


def linear(get: TensorSource, name: str, out: int, inp: int, bias: bool) -> dict:
    """An ``nn.Linear`` ``[out, in]`` as an NNX kernel ``[in, out]`` (and its bias)."""
    return dense(get(f"{name}.weight", (out, inp)).T, get(f"{name}.bias", (out,)) if bias else None)


def block(get: TensorSource, cfg: ModelConfig, p: str, norms: tuple[str, str]) -> dict:
    """One Llama-shaped layer ``p`` (e.g. ``model.layers.3``); ``norms``: the names of the layer's
    two RMSNorms, read as the attention's and the MLP's (``attn_norm``, ``mlp_norm``)."""
    d, f = cfg.d_model, cfg.ff_width
    q, kv, bias = cfg.num_heads * cfg.d_head, cfg.kv_heads * cfg.d_head, cfg.attention_bias
    a = f"{p}.self_attn"
    attn = {"query": linear(get, f"{a}.q_proj", q, d, bias), "key": linear(get, f"{a}.k_proj", kv, d, bias),
            "value": linear(get, f"{a}.v_proj", kv, d, bias),
            "out": linear(get, f"{a}.o_proj", d, q, bias and cfg.attention_out_bias)}
    if cfg.qk_norm:
        attn["query_norm"], attn["key_norm"] = rms(get, f"{a}.q_norm", q), rms(get, f"{a}.k_norm", kv)
    mlp = {name: linear(get, f"{p}.mlp.{name}_proj", *((d, f) if name == "down" else (f, d)), cfg.mlp_bias)
           for name in ("gate", "up", "down")}
    return {"attn": attn, "mlp": mlp, "attn_norm": rms(get, f"{p}.{norms[0]}", d),
            "mlp_norm": rms(get, f"{p}.{norms[1]}", d)}


def weights(get: TensorSource, cfg: ModelConfig, norms: tuple[str, str] = ("input_layernorm",
                                                                          "post_attention_layernorm")) -> dict:
    v, d = cfg.vocab_size, cfg.d_model
    return {"blocks": {i: block(get, cfg, f"model.layers.{i}", norms) for i in range(cfg.num_layers)},
            "final_norm": rms(get, "model.norm", d),
            **vocab(cfg, get("model.embed_tokens.weight", (v, d)), head(get, cfg, "lm_head.weight"))}


# Grouped-query attention (4 query heads over 2 key heads), an explicit head_dim, llama3 rope.
TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 6, "intermediate_size": 24, "max_position_embeddings": 16, "vocab_size": 40}

register_family(Family(
    "llama", config, weights, buffers=BUFFERS,
    tiny_config={"model_type": "llama", **TINY, "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}},
))
