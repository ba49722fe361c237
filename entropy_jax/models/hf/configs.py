"""Hugging Face ``config.json`` -> :class:`~entropy_jax.models.ModelConfig` (GPT-NeoX/Pythia and GPT-2).

GPT-NeoX config files come in two dialects: the Hub's Pythia files carry ``rotary_pct`` /
``rotary_emb_base`` (and sometimes ``rope_scaling``); files written by transformers 5 carry
``rope_parameters = {rope_type, rope_theta, partial_rotary_factor}``. Both are read. Every option
that would change the computation and is not implemented is refused by name, never ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

# Hugging Face activation names -> ModelConfig.activation ("gelu" there is the tanh form).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu",
               "silu": "silu"}
SUPPORTED = ("gpt_neox", "gpt2")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise HFImportError(f"{folder} has no config.json; point --hf_dir at a model revision folder "
                            "(config.json next to the safetensors files)")
    return json.loads(path.read_text())


def tokenizer_size(folder: Path) -> int | None:
    """Tokens of ``tokenizer.json`` (vocabulary plus added tokens: max id + 1); None without one."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    tok = json.loads(path.read_text())
    vocab = tok.get("model", {}).get("vocab", {})
    ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
    ids |= {t["id"] for t in tok.get("added_tokens", [])}
    return max(ids) + 1 if ids else None


def _activation(name: str, key: str) -> str:
    if name not in ACTIVATIONS:
        raise HFImportError(f"{key}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


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


def _padding(vocab_size: int, tokens: int | None) -> int:
    if tokens is None or tokens >= vocab_size:
        return 0
    return vocab_size - tokens


def _neox(hf: dict, tokens: int | None) -> ModelConfig:
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // heads):
        raise HFImportError(f"head_dim={hf['head_dim']} differs from hidden_size / num_attention_heads = {d // heads}")
    fraction, base = _rope(hf)
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"], num_heads=heads,
        d_ff=hf["intermediate_size"], max_len=hf["max_position_embeddings"], positions="rope",
        activation=_activation(hf.get("hidden_act", "gelu"), "hidden_act"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), attention_bias=bool(hf.get("attention_bias", True)),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)), norm_fast_variance=False,
        parallel_residual=bool(hf.get("use_parallel_residual", True)), rotary_fraction=fraction, rotary_base=base,
        vocab_padding=_padding(hf["vocab_size"], tokens),
    )


def _gpt2(hf: dict, tokens: int | None) -> ModelConfig:
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if bool(hf.get(key, ok)) != ok:
            raise HFImportError(f"{key}={hf[key]!r} is not supported (only {ok})")
    d = hf["n_embd"]
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["n_layer"], num_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d, max_len=hf["n_positions"], positions="learned",
        activation=_activation(hf.get("activation_function", "gelu_new"), "activation_function"),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)), attention_bias=True,
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)), norm_fast_variance=False,
        vocab_padding=_padding(hf["vocab_size"], tokens),
    )


def model_config(hf: dict[str, Any], tokens: int | None = None) -> ModelConfig:
    """The ModelConfig computing what transformers computes for ``hf`` (a parsed config.json);
    ``tokens``: the tokenizer's size, whose excess embedding rows become ``vocab_padding``."""
    kind = hf.get("model_type")
    if kind not in SUPPORTED:
        raise HFImportError(f"model_type={kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    try:
        return _neox(hf, tokens) if kind == "gpt_neox" else _gpt2(hf, tokens)
    except KeyError as e:
        raise HFImportError(f"config.json of a {kind} model lacks {e.args[0]!r}") from None
    except ValueError as e:
        if isinstance(e, HFImportError):
            raise
        raise HFImportError(f"config.json gives an invalid model: {e}") from None
