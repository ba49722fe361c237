"""GPT-2 (Radford et al. 2019) from Hugging Face files.

Forward switches: learned positions, biases on every projection, torch's two-pass LayerNorm
variance, tied embeddings unless config.json unties them, the tanh GELU (``gelu_new``).

Layout (transformers' modelling code): ``Conv1D`` weights are already ``[in, out]`` (not
transposed); ``c_attn`` packs q, k, v as three contiguous blocks of columns ``[D, 3D]``. Names
may carry a ``transformer.`` prefix; older files store the causal mask as ``attn.bias`` /
``attn.masked_bias`` (ignored).
"""

from __future__ import annotations

from entropy_jax.models.hf.families.common import TensorSource, activation, dense, head, norm, vocab, vocab_padding
from entropy_jax.models.hf.families.registry import Family, register_family
from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

SWITCHES = dict(positions="learned", attention_bias=True, norm_fast_variance=False)
# Options transformers offers whose other value would change the computation: refused, never ignored.
FIXED = (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False), ("add_cross_attention", False))


def config(hf: dict, tokens: int | None) -> ModelConfig:
    for key, ok in FIXED:
        if bool(hf.get(key, ok)) != ok:
            raise HFImportError(f"{key}={hf[key]!r} is not supported (only {ok})")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"], **SWITCHES,
        activation=activation(hf.get("activation_function", "gelu_new"), "activation_function"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), vocab_padding=vocab_padding(hf["vocab_size"], tokens),
    )


def _block(get: TensorSource, cfg: ModelConfig, p: str) -> dict:
    d, f = cfg.d_model, cfg.ff_width
    w_Dx3D, b_3D = get(f"{p}.attn.c_attn.weight", (d, 3 * d)), get(f"{p}.attn.c_attn.bias", (3 * d,))
    attn = {name: dense(w_Dx3D[:, j * d:(j + 1) * d], b_3D[j * d:(j + 1) * d])
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = dense(get(f"{p}.attn.c_proj.weight", (d, d)), get(f"{p}.attn.c_proj.bias", (d,)))
    mlp = {"up": dense(get(f"{p}.mlp.c_fc.weight", (d, f)), get(f"{p}.mlp.c_fc.bias", (f,))),
           "down": dense(get(f"{p}.mlp.c_proj.weight", (f, d)), get(f"{p}.mlp.c_proj.bias", (d,)))}
    return {"attn": attn, "mlp": mlp, "attn_norm": norm(get, f"{p}.ln_1", d), "mlp_norm": norm(get, f"{p}.ln_2", d)}


def weights(get: TensorSource, cfg: ModelConfig) -> dict:
    v, d = cfg.vocab_size, cfg.d_model
    return {"blocks": {i: _block(get, cfg, f"h.{i}") for i in range(cfg.num_layers)},
            "pos_embed": {"embedding": get("wpe.weight", (cfg.max_len, d))},
            "final_norm": norm(get, "ln_f", d),
            **vocab(cfg, get("wte.weight", (v, d)), head(get, cfg, "lm_head.weight"))}


register_family(Family(
    "gpt2", config, weights, prefix="transformer.", buffers=("attn.bias", "attn.masked_bias"),
    tiny_config={"model_type": "gpt2", "n_embd": 16, "n_layer": 2, "n_head": 2, "n_positions": 16, "vocab_size": 40},
))
