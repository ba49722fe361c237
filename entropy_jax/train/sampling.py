"""Jitted sampling of short answers from the transformer, with a key/value cache.

:func:`sample` runs the prompt once (prefill), keeping every layer's keys and values, then feeds
one new token per step: each step costs one position, not the whole prefix. It reuses the
model's own modules (embedding, norms, projections, MLP, unembedding, ``rotary``); only the
attention over the cache is written here, the same arithmetic as ``CausalSelfAttention``.
:func:`sample_recompute` is the reference: a full forward pass over the growing sequence per
token. With the same key both pick the same tokens (tested), since step ``t`` draws with
``fold_in(rng, t)``. The decode loop is unrolled in Python: answers are a few tokens long, and a
static position per step keeps every shape static.

Temperature 0 is greedy decoding (argmax); otherwise tokens are drawn from
``softmax(logits / temperature)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from entropy_jax.models.transformer import rotary

Cache = list[tuple[jax.Array, jax.Array]]  # per layer (keys, values), each N x S x H x K


def pick(logits_NxV: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """The next token per row: argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature == 0:
        return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_NxV / temperature, axis=-1).astype(jnp.int32)


def _rotary_at(x_NxSxHxK: jax.Array, start: int, cfg) -> jax.Array:
    """The model's ``rotary`` at absolute positions ``start ..``: rotate a sequence padded in front."""
    n, s, h, k = x_NxSxHxK.shape
    padded = jnp.concatenate([jnp.zeros((n, start, h, k), x_NxSxHxK.dtype), x_NxSxHxK], axis=1)
    return rotary(padded, cfg.rotary_base, cfg.rotary_dims)[:, start:]


def _attend(attn, cfg, x_NxSxD: jax.Array, cache: tuple | None, start: int):
    """Causal self-attention of S new positions (``start ..``) over the cached ones and themselves."""
    n, s, _ = x_NxSxD.shape
    heads = lambda y: y.reshape(n, s, cfg.num_heads, cfg.d_head)
    x_MxD = x_NxSxD.reshape(n * s, cfg.d_model)
    q, k, v = heads(attn.query(x_MxD)), heads(attn.key(x_MxD)), heads(attn.value(x_MxD))
    if cfg.positions == "rope":
        q, k = _rotary_at(q, start, cfg), _rotary_at(k, start, cfg)
    if cache is not None:
        k, v = jnp.concatenate([cache[0], k], axis=1), jnp.concatenate([cache[1], v], axis=1)
    logits = jnp.einsum("nqhk,nshk->nhqs", q, k).astype(jnp.float32) / jnp.sqrt(cfg.d_head)
    causal = jnp.arange(start + s)[None, :] <= (start + jnp.arange(s))[:, None]  # S x (start + S)
    logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    y = jnp.einsum("nhqs,nshk->nqhk", probs, v).reshape(n * s, cfg.d_model)
    return attn.out(y).reshape(n, s, cfg.d_model), (k, v)


def _forward(model, tokens_NxS: jax.Array, cache: Cache | None, start: int) -> tuple[jax.Array, Cache]:
    """Logits at the last new position (N x V, float32) and the cache extended by the S new positions."""
    cfg = model.cfg
    h = model._embed(tokens_NxS)
    if cfg.positions == "learned":
        h = h + model.pos_embed(start + jnp.arange(tokens_NxS.shape[1]))[None]
    new_cache = []
    for i, block in enumerate(model.blocks):
        attn_out, kv = _attend(block.attn, cfg, block.attn_norm(h), None if cache is None else cache[i], start)
        new_cache.append(kv)
        if block.parallel:
            h = h + attn_out + block.mlp(block.mlp_norm(h))
        else:
            h = h + attn_out
            h = h + block.mlp(block.mlp_norm(h))
    h_last = model.final_norm(h)[:, -1]
    return model._unembed(h_last).astype(jnp.float32), new_cache


def sample(model, prompts_NxP: jax.Array, num_tokens: int, rng: jax.Array, temperature: float) -> jax.Array:
    """``num_tokens`` tokens after each prompt (int32 N x num_tokens), with a key/value cache."""
    p = prompts_NxP.shape[1]
    if p + num_tokens > model.cfg.max_len:
        raise ValueError(f"{p} prompt + {num_tokens} answer tokens exceed model.max_len={model.cfg.max_len}")
    logits, cache = _forward(model, prompts_NxP, None, 0)
    out = []
    for t in range(num_tokens):
        token = pick(logits, jax.random.fold_in(rng, t), temperature)
        out.append(token)
        if t + 1 < num_tokens:
            logits, cache = _forward(model, token[:, None], cache, p + t)
    return jnp.stack(out, axis=1)


def sample_recompute(model, prompts_NxP: jax.Array, num_tokens: int, rng: jax.Array,
                     temperature: float) -> jax.Array:
    """:func:`sample` by a full forward pass over the growing sequence per token (the reference)."""
    seq = prompts_NxP
    for t in range(num_tokens):
        token = pick(model(seq)[:, -1], jax.random.fold_in(rng, t), temperature)
        seq = jnp.concatenate([seq, token[:, None]], axis=1)
    return seq[:, prompts_NxP.shape[1]:]
