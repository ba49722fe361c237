"""Attention entropy from logits, its Theorem 3.1 lower bound (Zhai et al. 2023), head bins.

Entropies are exact and in **nats**: ``Ent(A_i) = logsumexp(z_i) - sum_j softmax(z_i)_j z_ij``,
no epsilon. Everything here is a pure ``jnp`` function and jit-compatible; it computes in the
logits' dtype (bf16/f16 are upcast to float32; pass float64 under x64 for float64 results).

The spectral norms that give the bound its s (exact, certified upper bounds, ``||W_K W_Q^T||``)
live in :mod:`entropy_jax.probes.matrix_norms`.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from entropy_jax.probes.matrix_norms import bilinear_form_norm, spectral_norm
from entropy_jax.probes.stats import as_float, at_least_float32, x64_when_eager


def row_entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Entropy of ``softmax`` over the last axis, nats: ``lse(z) - sum softmax(z) z``.

    Evaluated relative to the row's largest logit m, ``w = z - m <= 0``, as
    ``ln(1 + r) + (-sum_j e^(w_j) w_j) / (1 + r)`` with ``r = sum_j e^(w_j)`` over all keys but
    one argmax (``e^0 = 1`` is left out of the sum, not subtracted from it): two nonnegative
    terms, the first by ``log1p``, so the float32 result has a few ulps of *relative* error even
    for peaked rows of entropy 1e-8 (``-sum p (z - lse)`` has an absolute error of about
    ``eps |z|``, ~1e-6 nats, there, above the Theorem 3.1 bound's gap to the entropy).

    ``mask`` (bool, broadcastable, True = key visible) removes keys; a row with no visible key
    (all keys masked, or all logits ``-inf``) has no distribution and gets NaN.
    """
    z = at_least_float32(logits)
    if mask is not None:
        z = jnp.where(mask, z, -jnp.inf)
    top = jnp.max(z, axis=-1, keepdims=True)
    w = z - jnp.where(jnp.isfinite(top), top, 0.0)
    e = jnp.exp(w)
    first_max = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=bool)
    r = jnp.sum(jnp.where(first_max, 0.0, e), axis=-1)
    u = jnp.sum(jnp.where(e > 0, e * w, 0.0), axis=-1)
    ent = jnp.log1p(r) - u / (1.0 + r)
    return jnp.where(jnp.any(z > -jnp.inf, axis=-1), ent, jnp.nan)


def predictive_entropy(logits: Any) -> jax.Array:
    """Entropy of the next-token distribution ``softmax(logits)`` per position, nats.

    ``H = logsumexp(z) - sum_v softmax(z)_v z_v`` over the vocabulary (last) axis; ``ln V`` for
    uniform logits, 0 for one-hot limits. Shape: ``logits.shape[:-1]``.
    """
    return row_entropy(logits)


def causal_mask(num_queries: int, num_keys: int) -> jax.Array:
    """Bool (Tq, Tk): query i sees keys j <= i + (Tk - Tq) (queries are the last Tq positions)."""
    q = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
    return jnp.arange(num_keys)[None, :] <= q


def _aggregate(ent: jax.Array, num_keys: jax.Array) -> dict[str, jax.Array]:
    """Per-row entropies (..., B, H, Tq) -> per-head and per-layer means over valid rows."""
    valid = num_keys >= 1
    normalisable = num_keys >= 2
    norm = jnp.where(normalisable, ent / jnp.log(jnp.where(normalisable, num_keys, 2)), jnp.nan)

    def head_mean(v: jax.Array, w: jax.Array) -> jax.Array:
        w = jnp.broadcast_to(w, v.shape)
        num = jnp.sum(jnp.where(w, v, 0.0), axis=(-3, -1))
        return num / jnp.sum(w, axis=(-3, -1))

    head = head_mean(ent, valid)
    head_norm = head_mean(norm, normalisable)
    return {
        "row": jnp.where(valid, ent, jnp.nan),
        "row_normalised": norm,
        "num_keys": num_keys,
        "head": head,
        "head_normalised": head_norm,
        "layer": jnp.mean(head, axis=-1),
        "layer_normalised": jnp.mean(head_norm, axis=-1),
    }


def attention_entropy(logits: Any, mask: Any | None = None, *, causal: bool = False) -> dict[str, jax.Array]:
    """Attention entropy per row, head and layer from logits (Zhai et al. 2023, eq. for Ent(A_i)).

    ``logits``: (..., B, H, Tq, Tk), e.g. (L, B, H, T, T) stacked over layers or (B, H, T, T).
    ``mask``: bool broadcastable to it (True = key visible); ``causal=True`` adds the causal mask.
    Row i has ``T_i`` visible keys; ``row = lse(z_i) - sum softmax(z_i) z_i`` (nats, no epsilon),
    ``row_normalised = row / ln T_i`` (NaN where T_i < 2). ``head``: mean over examples and
    valid rows, shape (..., H); ``layer``: mean over heads, shape (...). Rows without visible
    keys are NaN in ``row`` and excluded from the means (a head with none is NaN). Uniform logits
    give ``ln T_i``; one-hot (limit) logits give 0.
    """
    z = at_least_float32(logits)
    if z.ndim < 4:
        raise ValueError(f"logits must be (..., B, H, Tq, Tk), got shape {z.shape}; add batch/head axes")
    visible = jnp.ones(z.shape[-2:], bool) if mask is None else jnp.asarray(mask, bool)
    if causal:
        visible = visible & causal_mask(*z.shape[-2:])
    visible = jnp.broadcast_to(visible, z.shape)
    return _aggregate(row_entropy(z, visible), jnp.sum(visible, axis=-1))


def _online_step(carry: tuple, z: jax.Array, visible: jax.Array) -> tuple:
    """Fold one key block into running (max m, sum s = Σe^(z-m), u = Σe^(z-m)(z-m))."""
    m, s, u = carry
    m_new = jnp.maximum(m, jnp.max(jnp.where(visible, z, -jnp.inf), axis=-1))
    m_ref = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    m_old = jnp.where(jnp.isfinite(m), m, 0.0)
    scale = jnp.where(jnp.isfinite(m), jnp.exp(m_old - m_ref), 0.0)
    shifted = jnp.where(visible, z - m_ref[..., None], 0.0)
    e = jnp.where(visible, jnp.exp(shifted), 0.0)
    s_new = scale * s + jnp.sum(e, axis=-1)
    u_new = scale * (u + s * (m_old - m_ref)) + jnp.sum(e * shifted, axis=-1)
    return m_new, s_new, u_new


@functools.partial(jax.jit, static_argnames=("causal", "key_block"))
def attention_entropy_blocked(
    q: jax.Array, k: jax.Array, *, causal: bool = False, key_block: int = 512, scale: float | None = None
) -> dict[str, jax.Array]:
    """:func:`attention_entropy` of ``logits = scale * q k^T`` without forming the Tq x Tk matrix.

    ``q``: (B, H, Tq, Dh), ``k``: (B, H, Tk, Dh); ``scale`` defaults to ``1/sqrt(Dh)``. Keys are
    visited in blocks of ``key_block`` with an online logsumexp (as flash attention does),
    carrying per row ``m = max z``, ``s = sum e^(z-m)`` and ``u = sum e^(z-m)(z-m)``; then
    ``Ent = ln s - u / s`` nats. Memory O(B H Tq key_block) instead of O(B H Tq Tk).
    """
    q, k = at_least_float32(q), at_least_float32(k)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tq, tk = q.shape[-2], k.shape[-2]
    nb = -(-tk // key_block)
    k = jnp.pad(k, ((0, 0), (0, 0), (0, nb * key_block - tk), (0, 0)))
    k_blocks = jnp.moveaxis(k.reshape(*k.shape[:2], nb, key_block, k.shape[-1]), 2, 0)
    q_pos = jnp.arange(tq)[:, None] + (tk - tq)

    def body(carry: tuple, inp: tuple) -> tuple:
        kb, start = inp
        z = scale * jnp.einsum("bhqd,bhkd->bhqk", q, kb)
        key_pos = start + jnp.arange(key_block)[None, :]
        visible = (key_pos < tk) & ((key_pos <= q_pos) if causal else True)
        return _online_step(carry, z, visible), None

    shape = q.shape[:-1]
    init = (jnp.full(shape, -jnp.inf, q.dtype), jnp.zeros(shape, q.dtype), jnp.zeros(shape, q.dtype))
    (_, s, u), _ = jax.lax.scan(body, init, (k_blocks, jnp.arange(nb) * key_block))
    num_keys = jnp.broadcast_to(jnp.minimum(q_pos[:, 0] + 1, tk) if causal else tk, shape)
    return _aggregate(jnp.log(s) - u / s, num_keys)


@x64_when_eager
def attention_entropy_lower_bound(s: Any, num_keys: Any) -> jax.Array:
    """Minimum entropy of ``softmax(z)`` over logit rows with ``||z||_2 <= s`` (Zhai et al. 2023, Thm 3.1).

    ``Ent >= ln(1 + (T-1) b) + s sqrt(T (T-1)) b / (1 + (T-1) b)``, ``b = exp(-s sqrt(T / (T-1)))``,
    T = ``num_keys``; nats. Decreasing in s, ``ln T`` at s = 0, 0 at s = inf; 0 when T = 1; NaN when T = 0 (no
    key, no distribution). Broadcasts. float64 when called eagerly (whatever the input dtype);
    the trace's float dtype under jit.
    """
    s, t = jnp.broadcast_arrays(as_float(s), as_float(num_keys))
    t_safe = jnp.maximum(t, 2.0)
    b = jnp.exp(-s * jnp.sqrt(t_safe / (t_safe - 1.0)))
    denom = 1.0 + (t_safe - 1.0) * b
    # s b -> 0 as s -> inf; at s = inf the product would be inf * 0 = NaN.
    s_b = jnp.where(b > 0, s * b, 0.0)
    bound = jnp.log1p((t_safe - 1.0) * b) + s_b * jnp.sqrt(t_safe * (t_safe - 1.0)) / denom
    return jnp.where(t >= 2, bound, jnp.where(t >= 1, 0.0, jnp.nan))


def attention_entropy_bounds(
    logits: Any,
    mask: Any | None = None,
    *,
    causal: bool = False,
    w_q: Any | None = None,
    w_k: Any | None = None,
    x: Any | None = None,
    norm: str = "exact",
) -> dict[str, jax.Array]:
    """Measured row entropies of one head beside Theorem 3.1 bounds for three choices of s (nats).

    ``logits``: (Tq, Tk) of one head and example. Row i has T_i visible keys. Choices of s, each
    returned as ``s_<name>`` with its bound ``bound_<name>``: ``row`` = the row's own
    ``||z_i||_2`` (tightest, per row); ``logits`` = spectral norm of the (masked, zero-filled)
    logit matrix; ``weights`` = ``||W_K W_Q^T||_2 ||X X^T||_2`` when ``w_q``, ``w_k`` (D, Dh) and
    ``x`` (T, D) are given (fold any 1/sqrt(Dh) into ``w_q``), else absent. Each s bounds every
    row norm, so ``measured >= bound_row >= bound_logits >= bound_weights`` row by row. Also
    ``measured`` (row entropies) and ``num_keys``; a row with no visible key has NaN
    ``measured`` and bounds. ``norm`` chooses how the logit matrix's and X's spectral norms are
    taken (:func:`spectral_norm`): ``"exact"`` (``eigvalsh`` of the smaller Gram, never an SVD,
    so the function can be mapped over heads) or ``"certified"`` (an upper bound from products
    only, :func:`spectral_norm_upper_bound`: a larger s, hence a lower but still valid bound;
    the ordering between ``bound_logits`` and ``bound_weights`` is then not guaranteed).
    ``||W_K W_Q^T||_2`` is exact in both (:func:`bilinear_form_norm`).
    """
    z = at_least_float32(logits)
    if z.ndim != 2:
        raise ValueError(f"logits must be one head's (Tq, Tk) matrix, got shape {z.shape}")
    visible = jnp.ones(z.shape, bool) if mask is None else jnp.broadcast_to(jnp.asarray(mask, bool), z.shape)
    if causal:
        visible = visible & causal_mask(*z.shape)
    num_keys = jnp.sum(visible, axis=-1)
    z_vis = jnp.where(visible, z, 0.0)
    s = {"row": jnp.linalg.norm(z_vis, axis=-1), "logits": spectral_norm(z_vis, norm)}
    if w_q is not None and w_k is not None and x is not None:
        s["weights"] = bilinear_form_norm(w_q, w_k) * spectral_norm(x, norm) ** 2  # ||X X^T||_2 = ||X||_2^2
    out = {"measured": row_entropy(z, visible), "num_keys": num_keys}
    for name, value in s.items():
        out[f"s_{name}"] = value
        out[f"bound_{name}"] = attention_entropy_lower_bound(value, num_keys)
    return out


def head_entropy_bins(entropies: Any, max_entropy: Any | None = None) -> dict[str, jax.Array]:
    """Fractions of heads per quarter of the maximum head entropy (Jha & Reagen 2025).

    ``entropies``: per-head mean entropies (nats), shape (H,) or (L, H). Quarters of
    ``max_entropy`` (default: the largest observed): [0, 1/4), [1/4, 1/2), [1/2, 3/4), [3/4, 1].
    ``fractions`` (4,) over all heads; ``per_layer`` (L, 4) for 2-D input. Many heads in the top
    quarter (early layers) = entropic overload; in the bottom quarter (deep layers) = collapse.
    """
    e = at_least_float32(entropies)
    if e.ndim not in (1, 2):
        raise ValueError(f"entropies must be (H,) or (L, H) per-head values, got shape {e.shape}")
    top = jnp.max(e) if max_entropy is None else at_least_float32(max_entropy)
    quarter = jnp.clip(jnp.floor(4.0 * e / jnp.where(top > 0, top, 1.0)), 0, 3).astype(jnp.int32)
    onehot = jax.nn.one_hot(quarter, 4, dtype=e.dtype)
    out = {"fractions": jnp.mean(onehot.reshape(-1, 4), axis=0), "max_entropy": top}
    if e.ndim == 2:
        out["per_layer"] = jnp.mean(onehot, axis=1)
    return out
