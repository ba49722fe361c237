"""Hugging Face tensor names and layouts -> the NNX parameter tree of :class:`~entropy_jax.models.Transformer`.

Layouts (transformers' modelling code):

* HF ``nn.Linear`` weights are ``[out, in]``; NNX kernels are ``[in, out]``: transposed.
* GPT-2's ``Conv1D`` weights are already ``[in, out]``: not transposed. Its ``c_attn`` packs
  q, k, v as three contiguous blocks of columns ``[D, 3D]``.
* GPT-NeoX's ``query_key_value`` packs q, k, v *per head*: its ``3D`` output rows are
  ``heads x 3 x d_head`` (``view(..., heads, 3 * d_head).chunk(3)``), so the weight reshapes to
  ``[heads, 3, d_head, D]`` before q, k and v are taken.
* Embedding rows beyond the tokenizer go to ``embed_padding`` / ``unembed_padding`` (model state).
* Causal-mask and rotary buffers stored by older files (``attn.bias``, ``attn.masked_bias``,
  ``attention.bias``, ``attention.masked_bias``, ``rotary_emb.inv_freq``) are ignored; GPT-2 names
  may carry a ``transformer.`` prefix. Any other missing, extra or misshapen tensor is refused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

BUFFERS = re.compile(r"\.(attn\.bias|attn\.masked_bias|attention\.bias|attention\.masked_bias|rotary_emb\.inv_freq)$")
STATE_KEYS = ("embed_padding", "unembed_padding")  # model state (entropy_jax.models.transformer.PaddingRows)
Path_ = tuple[Any, ...]


class _Source:
    """The HF tensors by name: hands each out once, collects what is missing or misshapen."""

    def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str = ""):
        strip = lambda n: n[len(prefix):] if prefix and n.startswith(prefix) else n
        self.tensors = {strip(k): v for k, v in tensors.items() if not BUFFERS.search(k)}
        self.used: set[str] = set()
        self.problems: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            self.problems.append(f"missing {name} {shape}")
            return np.zeros(shape, np.float32)
        self.used.add(name)
        a = np.asarray(self.tensors[name], dtype=np.float32)  # no copy for float32 (or zero-stride) inputs
        if a.shape != tuple(shape):
            self.problems.append(f"{name} has shape {a.shape}, the config implies {tuple(shape)}")
            return np.zeros(shape, np.float32)
        return a

    def check(self, where: str) -> None:
        extra = sorted(set(self.tensors) - self.used)
        problems = self.problems + ([f"unexpected tensors {extra}"] if extra else [])
        if problems:
            raise HFImportError(f"{where}: " + "; ".join(problems) + " (a different or damaged model revision?)")


def _norm(get: _Source, name: str, d: int) -> dict:
    return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}


def _dense(kernel: np.ndarray, bias: np.ndarray | None) -> dict:
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def _vocab(cfg: ModelConfig, embed_VxD: np.ndarray, unembed_VxD: np.ndarray | None) -> dict:
    n = cfg.num_tokens
    out = {"embed": {"embedding": embed_VxD[:n]}}
    if cfg.vocab_padding:
        out["embed_padding"] = embed_VxD[n:]
    if unembed_VxD is not None:
        out["unembed"] = {"kernel": unembed_VxD[:n].T}
        if cfg.vocab_padding:
            out["unembed_padding"] = unembed_VxD[n:].T
    return out


def _neox_block(get: _Source, cfg: ModelConfig, p: str) -> dict:
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_head, cfg.ff_width
    w_Hx3xKxD = get(f"{p}.attention.query_key_value.weight", (3 * d, d)).reshape(h, 3, k, d)
    b_Hx3xK = (get(f"{p}.attention.query_key_value.bias", (3 * d,)).reshape(h, 3, k)
               if cfg.attention_bias else None)
    attn = {name: _dense(w_Hx3xKxD[:, j].reshape(d, d).T, None if b_Hx3xK is None else b_Hx3xK[:, j].reshape(d))
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = _dense(get(f"{p}.attention.dense.weight", (d, d)).T,
                         get(f"{p}.attention.dense.bias", (d,)) if cfg.attention_bias else None)
    mlp = {"up": _dense(get(f"{p}.mlp.dense_h_to_4h.weight", (f, d)).T, get(f"{p}.mlp.dense_h_to_4h.bias", (f,))),
           "down": _dense(get(f"{p}.mlp.dense_4h_to_h.weight", (d, f)).T, get(f"{p}.mlp.dense_4h_to_h.bias", (d,)))}
    return {"attn": attn, "mlp": mlp, "attn_norm": _norm(get, f"{p}.input_layernorm", d),
            "mlp_norm": _norm(get, f"{p}.post_attention_layernorm", d)}


def _neox(get: _Source, cfg: ModelConfig) -> dict:
    v, d = cfg.vocab_size, cfg.d_model
    head = "embed_out.weight" if "embed_out.weight" in get else "lm_head.weight"
    unembed = None
    if not cfg.tie_embeddings:
        unembed = get(head, (v, d))
    elif head in get:  # a tied model may still store the (identical) head
        get(head, (v, d))
    return {"blocks": {i: _neox_block(get, cfg, f"gpt_neox.layers.{i}") for i in range(cfg.num_layers)},
            "final_norm": _norm(get, "gpt_neox.final_layer_norm", d),
            **_vocab(cfg, get("gpt_neox.embed_in.weight", (v, d)), unembed)}


def _gpt2_block(get: _Source, cfg: ModelConfig, p: str) -> dict:
    d, f = cfg.d_model, cfg.ff_width
    w_Dx3D, b_3D = get(f"{p}.attn.c_attn.weight", (d, 3 * d)), get(f"{p}.attn.c_attn.bias", (3 * d,))
    attn = {name: _dense(w_Dx3D[:, j * d:(j + 1) * d], b_3D[j * d:(j + 1) * d])
            for j, name in enumerate(("query", "key", "value"))}
    attn["out"] = _dense(get(f"{p}.attn.c_proj.weight", (d, d)), get(f"{p}.attn.c_proj.bias", (d,)))
    mlp = {"up": _dense(get(f"{p}.mlp.c_fc.weight", (d, f)), get(f"{p}.mlp.c_fc.bias", (f,))),
           "down": _dense(get(f"{p}.mlp.c_proj.weight", (f, d)), get(f"{p}.mlp.c_proj.bias", (d,)))}
    return {"attn": attn, "mlp": mlp, "attn_norm": _norm(get, f"{p}.ln_1", d), "mlp_norm": _norm(get, f"{p}.ln_2", d)}


def _gpt2(get: _Source, cfg: ModelConfig) -> dict:
    v, d = cfg.vocab_size, cfg.d_model
    unembed = None
    if not cfg.tie_embeddings:
        unembed = get("lm_head.weight", (v, d))
    elif "lm_head.weight" in get:
        get("lm_head.weight", (v, d))
    return {"blocks": {i: _gpt2_block(get, cfg, f"h.{i}") for i in range(cfg.num_layers)},
            "pos_embed": {"embedding": get("wpe.weight", (cfg.max_len, d))},
            "final_norm": _norm(get, "ln_f", d), **_vocab(cfg, get("wte.weight", (v, d)), unembed)}


def convert(model_type: str, cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
            where: str = "the weights") -> tuple[dict, dict]:
    """(parameters, model state) as pure dicts in the NNX tree's layout (``nnx.to_pure_dict``),
    float32. Raises HFImportError naming every missing, extra or misshapen tensor."""
    if model_type == "gpt_neox":
        get = _Source(tensors)
        tree = _neox(get, cfg)
    elif model_type == "gpt2":
        get = _Source(tensors, prefix="transformer.")
        tree = _gpt2(get, cfg)
    else:
        raise HFImportError(f"model_type={model_type!r} is not supported; supported: gpt_neox, gpt2")
    get.check(where)
    state = {k: tree.pop(k) for k in STATE_KEYS if k in tree}
    return tree, state
