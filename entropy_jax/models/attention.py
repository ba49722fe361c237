"""Causal attention arithmetic: rotary positions, the probes' logits, the fused mixing, and the
key/value cache that decoding extends one position at a time.

Every function takes heads as ``BxTxHxK`` (batch, positions, heads, d_head). The training and
probe forward runs :func:`fused_attention` over a whole sequence; decoding runs
:func:`attend_from` over a :class:`LayerCache`, whose buffers are preallocated to the longest
sequence decoded, so every step has the same static shapes under jit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def rope_frequencies(dims: int, base: float = 10_000.0, scaling: str = "none", factor: float = 1.0,
                     low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                     original_max_len: int = 0) -> np.ndarray:
    """Rotary angular frequencies ``base^(-2i/dims)``, i < dims/2, float32, with a context scaling.

    ``linear`` (position interpolation, Chen et al. 2023): every frequency divided by ``factor``.
    ``llama3`` (Llama 3.1, Meta 2024): with wavelengths ``2 pi / f`` and ``L`` the original context
    length, frequencies of wavelength above ``L / low_freq_factor`` are divided by ``factor``, below
    ``L / high_freq_factor`` kept, and in between interpolated,
    ``(1 - s) f / factor + s f`` with ``s = (L / wavelength - low) / (high - low)``.
    Computed in float64, then rounded once to float32.
    """
    freqs = base ** (-np.arange(0, dims // 2, dtype=np.float64) * 2 / dims)
    if scaling == "linear":
        freqs = freqs / factor
    elif scaling == "llama3":
        wavelen = 2 * np.pi / freqs
        smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        banded = np.where(wavelen > original_max_len / low_freq_factor, freqs / factor, freqs)
        medium = (wavelen >= original_max_len / high_freq_factor) & (wavelen <= original_max_len / low_freq_factor)
        freqs = np.where(medium, (1 - smooth) * banded / factor + smooth * banded, banded)
    elif scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} is not one of 'none', 'linear', 'llama3'")
    return freqs.astype(np.float32)


def rotary(x_BxTxHxK: jax.Array, base: float = 10_000.0, dims: int | None = None,
           positions_T: jax.Array | None = None, freqs: np.ndarray | None = None) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half form, on the first ``dims`` entries
    of the last axis (default all; GPT-NeoX rotates a fraction and passes the rest through), at
    absolute ``positions_T`` (default ``0 .. T-1``; decoding passes the positions of new tokens),
    with angular frequencies ``freqs`` (default :func:`rope_frequencies` of ``dims`` and ``base``)."""
    dims = x_BxTxHxK.shape[-1] if dims is None else dims
    if dims < x_BxTxHxK.shape[-1]:
        rotated = rotary(x_BxTxHxK[..., :dims], base, positions_T=positions_T, freqs=freqs)
        return jnp.concatenate([rotated, x_BxTxHxK[..., dims:]], axis=-1)
    t, k = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
    positions_T = jnp.arange(t, dtype=jnp.float32) if positions_T is None else positions_T.astype(jnp.float32)
    freqs = base ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2 / k) if freqs is None else jnp.asarray(freqs)
    angles = positions_T[:, None] * freqs[None, :]  # T x K/2
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def attention_logits(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array) -> jax.Array:
    """Pre-softmax causal logits ``q k^T / sqrt(d_head)``, ``BxHxTxT`` float32, masked entries at the
    most negative finite float32 (softmax gives exact zeros, no NaNs): what the probes read. With
    fewer key heads than query heads (grouped-query attention), one logit matrix per query head."""
    t, d_head = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
    k_BxTxHxK = repeat_kv(k_BxTxHxK, q_BxTxHxK.shape[2])
    logits_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK).astype(jnp.float32) / jnp.sqrt(d_head)
    causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
    return jnp.where(causal_TxT, logits_BxHxTxT, jnp.finfo(jnp.float32).min)


def explicit_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal softmax attention written out, ``softmax(attention_logits) v``: the reference that
    :func:`fused_attention` is tested against."""
    probs = jax.nn.softmax(attention_logits(q_BxTxHxK, k_BxTxHxK), axis=-1).astype(v_BxTxHxK.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", probs, repeat_kv(v_BxTxHxK, q_BxTxHxK.shape[2]))


def repeat_kv(x_BxTxGxK: jax.Array, num_heads: int) -> jax.Array:
    """G key/value heads shared by ``num_heads`` query heads: query head h reads head
    ``h // (num_heads / G)`` (grouped-query attention, Ainslie et al. 2023; transformers' ``repeat_kv``)."""
    groups = x_BxTxGxK.shape[2]
    return x_BxTxGxK if groups == num_heads else jnp.repeat(x_BxTxGxK, num_heads // groups, axis=2)


def attend_from(q_BxSxHxK: jax.Array, k_BxLxHxK: jax.Array, v_BxLxHxK: jax.Array,
                start: int | jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(d_head)) v`` of S queries at absolute positions ``start .. start+S-1``
    over keys at positions ``0 .. L-1``: query i sees key j iff ``j <= start + i``, so keys past
    the queries (later positions, or cache rows not yet written) get exactly zero weight."""
    s, length = q_BxSxHxK.shape[1], k_BxLxHxK.shape[1]
    mask_1x1xSxL = ((start + jnp.arange(s))[:, None] >= jnp.arange(length)[None, :])[None, None]
    return jax.nn.dot_product_attention(q_BxSxHxK, k_BxLxHxK, v_BxLxHxK, mask=mask_1x1xSxL)


def fused_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                    query_block: int | None = None) -> jax.Array:
    """Causal ``softmax(q k^T / sqrt(d_head)) v`` through ``jax.nn.dot_product_attention`` (softmax
    in float32); the logits stay inside it.

    On GPUs one causal call, for which JAX selects cuDNN's flash attention (it skips the masked
    half itself). Elsewhere XLA lowers the call to full ``T x T`` matmuls, so the queries go in
    blocks of ``query_block`` positions (default :func:`default_query_block`), each attending
    only to the keys up to its last position: block i of n computes i/n of the square, (n+1)/2n
    of the work in all (62.5 % for n = 4), the same numbers to float tolerance.
    """
    t = q_BxTxHxK.shape[1]
    block = default_query_block(t) if query_block is None else query_block
    if block >= t:
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True)
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        out.append(attend_from(q_BxTxHxK[:, start:end], k_BxTxHxK[:, :end], v_BxTxHxK[:, :end], start))
    return jnp.concatenate(out, axis=1)


def default_query_block(t: int) -> int:
    """``t`` (one call) on GPUs and for short sequences; else a quarter of ``t``, at least 64
    positions (smaller blocks lose more to small-matmul overhead than they save; measured on
    XLA:CPU at the reference shape, T = 256: 4 blocks 1.10x, 2 blocks 1.09x the step rate of one)."""
    if jax.default_backend() == "gpu" or t < 128:
        return t
    return max(64, -(-t // 4))


class LayerCache(NamedTuple):
    """One layer's keys (after rotary) and values at positions ``0 .. L-1``: ``BxLxHxK`` buffers,
    written up to the cache's end position (the rest is never attended to, see :func:`attend_from`)."""

    keys: jax.Array
    values: jax.Array

    def write(self, k_BxSxHxK: jax.Array, v_BxSxHxK: jax.Array, start: int | jax.Array) -> LayerCache:
        """The buffers with positions ``start .. start+S-1`` set to ``k``, ``v``."""
        put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x.astype(buf.dtype), start, axis=1)
        return LayerCache(put(self.keys, k_BxSxHxK), put(self.values, v_BxSxHxK))


class KVCache(NamedTuple):
    """A pytree of per-layer :class:`LayerCache` and ``end``, the number of positions written (the
    absolute position of the next token; an int32 scalar, so steps share one compiled shape)."""

    layers: tuple[LayerCache, ...]
    end: jax.Array

    @classmethod
    def empty(cls, num_layers: int, batch: int, length: int, num_heads: int, d_head: int,
              dtype: jnp.dtype) -> KVCache:
        zeros = lambda: jnp.zeros((batch, length, num_heads, d_head), dtype)
        return cls(tuple(LayerCache(zeros(), zeros()) for _ in range(num_layers)), jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        """Positions the buffers hold (static)."""
        return self.layers[0].keys.shape[1]
