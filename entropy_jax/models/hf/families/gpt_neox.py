"""GPT-NeoX / Pythia (Black et al. 2022) from Hugging Face files.

Forward switches: rotary positions on the first ``rotary_pct`` of each head's dims (base
``rotary_emb_base``), a parallel residual unless config.json turns it off, attention biases,
torch's two-pass LayerNorm variance, the erf GELU, untied embeddings.

config.json comes in two dialects: the Hub's Pythia files carry ``rotary_pct`` /
``rotary_emb_base`` (and sometimes ``rope_scaling``); files written by transformers 5 carry
``rope_parameters = {rope_type, rope_theta, partial_rotary_factor}``. Both are read; scaled rope
is refused.

Layout: ``nn.Linear`` weights are ``[out, in]`` (transposed into NNX's ``[in, out]``).
``query_key_value`` packs q, k, v *per head*: its ``3D`` output rows are ``heads x 3 x d_head``
(``view(..., heads, 3 * d_head).chunk(3)``), so the weight reshapes to ``[heads, 3, d_head, D]``
before q, k and v are taken. The head is ``embed_out`` (Hub files) or ``lm_head``
(transformers 5); stored mask and rotary buffers are ignored.
"""

from __future__ import annotations

from entropy_jax.models.hf.families.common import TensorSource, activation, dense, head, norm, vocab, vocab_padding
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

SWITCHES = dict(positions="rope", norm_fast_variance=False)


def _rope(hf: dict) -> tuple[float, float]:
    """(rotary fraction, base) from either dialect; scaled or non-default rope is refused."""
    if hf.get("rope_scaling"):
        raise HFImportError(f"rope_scaling={hf['rope_scaling']!r} is not supported (only plain rotary positions)")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        raise HFImportError(f"rope_parameters.rope_type={params['rope_type']!r} is not supported (only 'default')")
    fraction = params.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    base = params.get("rope_theta", hf.get("rotary_emb_base", 10_000))
    return float(fraction), float(base)


def config(hf: dict, tokens: int | None) -> ModelConfig:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise HFImportError(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = {d // heads}")
    fraction, base = _rope(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"], **SWITCHES,
        activation=activation(hf.get("hidden_act", "gelu"), "hidden_act"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=bool(hf.get("attention_bias", True)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)), parallel_residual=bool(hf.get("use_parallel_residual", True)),
        rotary_fraction=fraction, rotary_base=base, vocab_padding=vocab_padding(hf["vocab_size"], tokens),
    )


def _block(get: TensorSource, cfg: ModelConfig, p: str) -> dict:
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_head, cfg.ff_width
    w_Hx3xKxD = get(f"{p}.attention.query_key_value.weight", (3 * d, d)).reshape(h, 3, k, d)
    b_Hx3xK = (get(f"{p}.attention.query_key_value.bias", (3 * d,)).reshape(h, 3, k)
               if cfg.attention_bias else None)
    attn = {name: dense(w_Hx3xKxD[:, j].reshape(d, d).T, None if b_Hx3xK is None else b_Hx3xK[:, j].reshape(d))
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = dense(get(f"{p}.attention.dense.weight", (d, d)).T,
                        get(f"{p}.attention.dense.bias", (d,)) if cfg.attention_bias else None)
    mlp = {"up": dense(get(f"{p}.mlp.dense_h_to_4h.weight", (f, d)).T, get(f"{p}.mlp.dense_h_to_4h.bias", (f,))),
           "down": dense(get(f"{p}.mlp.dense_4h_to_h.weight", (d, f)).T, get(f"{p}.mlp.dense_4h_to_h.bias", (d,)))}
    return {"attn": attn, "mlp": mlp, "attn_norm": norm(get, f"{p}.input_layernorm", d),
            "mlp_norm": norm(get, f"{p}.post_attention_layernorm", d)}


def weights(get: TensorSource, cfg: ModelConfig) -> dict:
    v, d = cfg.vocab_size, cfg.d_model
    unembed = head(get, cfg, "embed_out.weight" if "embed_out.weight" in get else "lm_head.weight")
    return {"blocks": {i: _block(get, cfg, f"gpt_neox.layers.{i}") for i in range(cfg.num_layers)},
            "final_norm": norm(get, "gpt_neox.final_layer_norm", d),
            **vocab(cfg, get("gpt_neox.embed_in.weight", (v, d)), unembed)}


register_family(Family(
    "gpt_neox", config, weights, buffers=("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"),
    tiny_config={"model_type": "gpt_neox", "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "intermediate_size": 40, "max_position_embeddings": 16, "vocab_size": 40},
))
