"""Jitted sampling of short answers from the transformer, with a key/value cache.

:func:`sample` runs the prompt once through the model with an empty cache (prefill), then feeds
one new token per step, ``model(token, cache=cache)``: each step costs one position, not the
whole prefix; the cache is the model's own (:meth:`~entropy_jax.models.Transformer.init_cache`).
:func:`sample_recompute` is the reference: a full forward pass over the growing sequence per
token. Step ``t`` draws with ``fold_in(rng, t)`` in both, so with the same key and a float32
model they pick the same tokens (tested). With ``model.dtype = "bfloat16"`` they agree only to
bfloat16 rounding: the cached step multiplies one query against the cache where the reference
recomputes the whole sequence, the products round differently, and the logits differ by up to
about 3e-2, so nearly tied tokens can differ (measured: 99.6% of tokens identical at temperature
2). The decode loop is unrolled in Python: answers are a few tokens long.

Temperature 0 is greedy decoding (argmax); otherwise tokens are drawn from
``softmax(logits / temperature)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pick(logits_NxV: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """The next token per row: argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature == 0:
        return jnp.argmax(logits_NxV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits_NxV / temperature, axis=-1).astype(jnp.int32)


def sample(model, prompts_NxP: jax.Array, num_tokens: int, rng: jax.Array, temperature: float) -> jax.Array:
    """``num_tokens`` tokens after each prompt (int32 N x num_tokens), with a key/value cache."""
    n, p = prompts_NxP.shape
    if p + num_tokens > model.cfg.max_len:
        raise ValueError(f"{p} prompt + {num_tokens} answer tokens exceed model.max_len={model.cfg.max_len}")
    logits_NxSxV, cache = model(prompts_NxP, cache=model.init_cache(n, p + num_tokens - 1))
    out = []
    for t in range(num_tokens):
        token = pick(logits_NxSxV[:, -1], jax.random.fold_in(rng, t), temperature)
        out.append(token)
        if t + 1 < num_tokens:
            logits_NxSxV, cache = model(token[:, None], cache=cache)
    return jnp.stack(out, axis=1)


def sample_recompute(model, prompts_NxP: jax.Array, num_tokens: int, rng: jax.Array,
                     temperature: float) -> jax.Array:
    """:func:`sample` by a full forward pass over the growing sequence per token (the reference)."""
    seq = prompts_NxP
    for t in range(num_tokens):
        token = pick(model(seq)[:, -1], jax.random.fold_in(rng, t), temperature)
        seq = jnp.concatenate([seq, token[:, None]], axis=1)
    return seq[:, prompts_NxP.shape[1]:]
