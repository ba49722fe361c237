"""A made-up Hugging Face family, ``model_type = "dummy_gpt"``: GPT-2's computation under other
tensor names and torch ``nn.Linear`` layouts (``[out, in]``, separate q, k, v). Importing this
module registers it: what adding a real family takes (this module, and its import line in
entropy_jax/models/hf/families/__init__.py).

config.json: ``dim``, ``layers``, ``heads``, ``context``, ``vocab_size``, optional ``eps``.
"""

from entropy_jax.models import ModelConfig
from entropy_jax.models.hf.families import Family, TensorSource, register_family
from entropy_jax.models.hf.families.common import dense, head, norm, vocab, vocab_padding

SWITCHES = dict(positions="learned", attention_bias=True, norm_fast_variance=False, activation="gelu",
                tie_embeddings=True)


def config(hf: dict, tokens: int | None) -> ModelConfig:
    return ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["dim"], num_layers=hf["layers"], num_heads=hf["heads"],
                       max_len=hf["context"], norm_eps=float(hf.get("eps", 1e-5)),
                       vocab_padding=vocab_padding(hf["vocab_size"], tokens), **SWITCHES)


def _linear(get: TensorSource, name: str, d_in: int, d_out: int) -> dict:
    return dense(get(f"{name}.weight", (d_out, d_in)).T, get(f"{name}.bias", (d_out,)))


def _block(get: TensorSource, cfg: ModelConfig, p: str) -> dict:
    d, f = cfg.d_model, cfg.ff_width
    attn = {name: _linear(get, f"{p}.attn.{short}", d, d)
            for name, short in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o"))}
    mlp = {"up": _linear(get, f"{p}.ffn.fc1", d, f), "down": _linear(get, f"{p}.ffn.fc2", f, d)}
    return {"attn": attn, "mlp": mlp, "attn_norm": norm(get, f"{p}.norm1", d), "mlp_norm": norm(get, f"{p}.norm2", d)}


def weights(get: TensorSource, cfg: ModelConfig) -> dict:
    d = cfg.d_model
    return {"blocks": {i: _block(get, cfg, f"layers.{i}") for i in range(cfg.num_layers)},
            "pos_embed": {"embedding": get("pos_embeddings.weight", (cfg.max_len, d))},
            "final_norm": norm(get, "norm", d),
            **vocab(cfg, get("tok_embeddings.weight", (cfg.vocab_size, d)), head(get, cfg, "output.weight"))}


register_family(Family("dummy_gpt", config, weights, tiny_config={
    "model_type": "dummy_gpt", "dim": 16, "layers": 2, "heads": 2, "context": 16, "vocab_size": 40}))
