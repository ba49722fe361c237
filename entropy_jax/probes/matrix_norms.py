"""Spectral norms of matrices: exact (``eigvalsh`` of the smaller Gram), certified upper bounds, ``||W_K W_Q^T||_2``.

The s of the attention-entropy bound (:func:`~entropy_jax.probes.attention.attention_entropy_bounds`)
is a spectral norm. The exact one needs LAPACK (map it one matrix at a time in sharded CPU
programs); :func:`spectral_norm_upper_bound` is never below it and uses matrix products only, so
it vmaps anywhere. Computed in the input's float dtype (at least float32).

Every product here runs at ``jax.lax.Precision.HIGHEST``: JAX's default float32 matmul on recent
GPUs is TF32 (operands rounded to 10 mantissa bits) and on TPUs one bfloat16 pass (7 bits), which
put the certified bound below the true norm (by up to 3e-5 with TF32, 3e-4 with bfloat16) and
the exact norm off by as much. A margin for that unit roundoff (2^-11 or 2^-8, against 2^-24)
would loosen the bound on every backend; full-precision products cost a few extra passes on
accelerators only, where these small matrices are not the bottleneck.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from entropy_jax.probes.stats import at_least_float32

# Full float32 products on every backend (see the module docstring).
_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)

NORM_METHODS = ("certified", "exact")


def _unit_scaled(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A / c, c)`` with ``c = max |a_ij|`` (1 for A = 0): ``||A|| = c ||A / c||``, and the
    squares and Grams of ``A / c`` neither overflow nor underflow (float32 Grams of entries about
    1e19 overflow, of entries about 1e-19 underflow)."""
    c = jnp.max(jnp.abs(a))
    return a / jnp.where(c > 0, c, 1.0), c


def _spectral_norm_exact(a: jax.Array) -> jax.Array:
    """``||A||_2`` = ``c sqrt(lambda_max)`` of the smaller Gram of ``A / c`` (:func:`_unit_scaled`), by ``eigvalsh``.

    Not ``jnp.linalg.norm(ord=2)``: that is an SVD (``gesdd``), and under ``vmap`` a batched
    ``gesdd`` deadlocks XLA:CPU in a program sharded over several CPU devices.
    """
    a, c = _unit_scaled(a)
    gram = _mm(a.T, a) if a.shape[-1] <= a.shape[-2] else _mm(a, a.T)
    return c * jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[-1], 0.0))


def _orthonormal_columns(y: jax.Array) -> jax.Array:
    """Classical Gram–Schmidt applied twice per column ("twice is enough"), matmuls only.

    A column with under 1% of its norm outside the span of the previous ones becomes 0 (its
    normalised remainder would be mostly rounding). The result is orthonormal to rounding on its
    nonzero columns; callers must not rely on more (see :func:`spectral_norm_upper_bound`).
    """

    def column(j: jax.Array, q: jax.Array) -> jax.Array:
        v0 = jax.lax.dynamic_index_in_dim(y, j, axis=1, keepdims=False)
        v = v0 - _mm(q, _mm(q.T, v0))
        v = v - _mm(q, _mm(q.T, v))
        n, n0 = jnp.linalg.norm(v), jnp.linalg.norm(v0)
        keep = n > 1e-2 * n0
        return q.at[:, j].set(jnp.where(keep, v / jnp.where(keep, n, 1.0), 0.0))

    return jax.lax.fori_loop(0, y.shape[1], column, jnp.zeros_like(y))


def _max_eigenvalue_upper_bound(s: jax.Array, squarings: int) -> jax.Array:
    """``lambda_max(S) <= ||S^m||_F^(1/m)``, m = 2^squarings, for symmetric S (k x k).

    True for every symmetric S: ``||S^m||_F^2 = sum_i lambda_i^(2m) >= max_i |lambda_i|^(2m)``;
    at most ``k^(1/(2m))`` times too large. Computed by repeated squaring, rescaled to unit
    Frobenius norm at each step and the log scales accumulated, so nothing overflows.
    """
    s = (s + s.T) / 2
    f0 = jnp.linalg.norm(s)
    a = s / jnp.where(f0 > 0, f0, 1.0)
    log_bound = jnp.log(jnp.where(f0 > 0, f0, 1.0))
    for i in range(1, squarings + 1):
        a = _mm(a, a)
        f = jnp.linalg.norm(a)  # >= lambda_max(a)^2 >= 1/k since ||a||_F = 1 before squaring
        log_bound = log_bound + jnp.log(f) / 2**i
        a = a / f
    return jnp.where(f0 > 0, jnp.exp(log_bound), 0.0)


def _entrywise_norm_bounds_squared(a: jax.Array) -> jax.Array:
    """``min(||A||_F^2, ||A||_1 ||A||_inf)``: both are at least ``||A||_2^2`` (Hölder)."""
    frobenius = jnp.sum(a * a)
    holder = jnp.max(jnp.sum(jnp.abs(a), axis=0)) * jnp.max(jnp.sum(jnp.abs(a), axis=1))
    return jnp.minimum(frobenius, holder)


def _collatz_wielandt_squared(a: jax.Array, steps: int) -> jax.Array:
    """``max_i (N x)_i / x_i >= rho(N) >= ||A||_2^2`` with ``N = |A|^T |A|`` and x > 0.

    Collatz–Wielandt: for nonnegative N and positive x, ``D^-1 N D`` (D = diag x) is similar to N
    and its largest row sum is ``max_i (N x)_i / x_i``, which bounds every eigenvalue's modulus.
    ``|A^T A| <= N`` entrywise, so ``||A||_2^2 = rho(A^T A) <= rho(N)`` (Perron–Frobenius
    monotonicity). x starts at ones and takes ``steps`` power steps (kept positive).
    """
    n_abs = jnp.abs(a)
    apply = lambda x: _mm(n_abs.T, _mm(n_abs, x))
    x = jnp.ones(a.shape[1], a.dtype)
    for _ in range(steps):
        y = apply(x)
        x = y / jnp.maximum(jnp.max(y), jnp.finfo(a.dtype).tiny) + 1e-6
    y = apply(x)
    return jnp.max(y / x)


def _projection_bound_squared(a: jax.Array, q: jax.Array, squarings: int) -> jax.Array:
    """``(1 + 3 delta) ||Q^T A||_2^2 + ||A - Q Q^T A||_2^2 >= ||A||_2^2`` for any Q (m x k).

    With ``B = Q^T A``, ``R = A - Q B``, ``E = Q^T Q - D`` (D = 1 on Q's nonzero columns, 0 on
    its zero ones; B's rows there are 0, so ``D B = B``) and ``delta = ||E||_F >= ||E||_2``: for
    a unit x, ``||A x||^2 = ||Q B x||^2 + ||R x||^2 + 2 (Q B x)^T R x``, where
    ``||Q B x||^2 = ||B x||^2 + x^T B^T E B x`` and ``Q^T R = B - Q^T Q B = -E B``, so the cross
    term is ``-2 x^T B^T E B x``; each E term is at most ``delta ||B||_2^2``. No orthogonality is
    assumed. ``||B||_2^2`` is bounded by :func:`_max_eigenvalue_upper_bound` of ``B B^T`` and
    ``||R||_2^2`` by :func:`_entrywise_norm_bounds_squared`.
    """
    b = _mm(q.T, a)
    r = a - _mm(q, b)
    nonzero = (jnp.sum(q * q, axis=0) > 0).astype(a.dtype)
    delta = jnp.linalg.norm(_mm(q.T, q) - jnp.diag(nonzero))
    return (1.0 + 3.0 * delta) * _max_eigenvalue_upper_bound(_mm(b, b.T), squarings) + _entrywise_norm_bounds_squared(r)


def _deflated_bound_squared(a: jax.Array, rank: int, power_steps: int, squarings: int) -> jax.Array:
    """:func:`_projection_bound_squared` with Q spanning ``rank`` directions from subspace
    iteration (``power_steps`` rounds) from a fixed Gaussian start: R keeps only the tail
    ``sigma_{k+1..}``, so the bound is about ``sigma_1^2 + sum_{i > k} sigma_i^2``."""
    omega = jax.random.normal(jax.random.key(0), (a.shape[1], rank), a.dtype)
    q = _orthonormal_columns(_mm(a, omega))
    for _ in range(power_steps):
        q = _orthonormal_columns(_mm(a, _orthonormal_columns(_mm(a.T, q))))
    return _projection_bound_squared(a, q, squarings)


def _flushed_norm_bound(a: jax.Array, c: jax.Array) -> jax.Array:
    """``sqrt(k) tiny + sqrt(m n) tiny c`` >= the spectral norm of what flushing subnormals to zero
    drops from A (k its subnormal entries, ``tiny`` the smallest normal float, ``c = max |a_ij|``).

    XLA:CPU (and GPUs) flush subnormal operands and results to zero: A's k subnormal entries are
    each below ``tiny``; entries of ``A / c`` below ``tiny`` are flushed too, each below ``c tiny``
    in A's units. The dropped matrix's Frobenius norm is at most the sum of the two. k is counted
    from the bit patterns (exponent field 0, mantissa not), which no flushing touches, so a zero
    A gets 0. The second term is computed only when ``c >= 1``: for ``c < 1`` the entries below
    ``c tiny`` are subnormal in A itself and already counted (and ``c tiny`` would flush).
    """
    finfo = jnp.finfo(a.dtype)
    bits = jax.lax.bitcast_convert_type(a, jnp.dtype(f"uint{finfo.bits}"))
    magnitude = bits & ~jnp.array(1 << (finfo.bits - 1), bits.dtype)  # clear the sign bit
    subnormal = jnp.sum((magnitude != 0) & (magnitude < (1 << finfo.nmant)))
    scaled = (a.shape[0] * a.shape[1]) ** 0.5 * finfo.tiny * jnp.where(c >= 1, c, 0.0)
    return jnp.sqrt(subnormal.astype(a.dtype)) * finfo.tiny + scaled


def spectral_norm_upper_bound(
    a: Any, *, rank: int = 8, power_steps: int = 2, squarings: int = 10, cw_steps: int = 4
) -> jax.Array:
    """A certified upper bound on ``||A||_2`` (largest singular value) from matrix products only.

    The minimum of four bounds, each ``>= ||A||_2^2`` in exact arithmetic (proofs in the helpers):
      * ``||A||_F^2`` and ``||A||_1 ||A||_inf`` (Hölder's ``||A||_2^2 <= ||A||_1 ||A||_inf``);
      * Collatz–Wielandt on ``|A|^T |A|`` after ``cw_steps`` power steps
        (:func:`_collatz_wielandt_squared`; tight for same-sign matrices);
      * deflation: a rank-``rank`` subspace Q from subspace iteration splits ``||A x||^2`` into
        ``||Q^T A x||^2 + ||(I - Q Q^T) A x||^2`` (corrected for Q's loss of orthogonality), the
        first bounded by ``||(Q^T A A^T Q)^m||_F^(1/m)``, m = ``2^squarings``, the second by
        its Frobenius norm (:func:`_deflated_bound_squared`); about
        ``sqrt(sigma_1^2 + sum_{i > rank} sigma_i^2)``, so tight when the spectrum decays.
    For a tall or wide A (``2 min(m, n) <= max(m, n)``, e.g. a T x D input with D <= T / 2) the
    bound is instead ``||(A^T A)^p||_F^(1/p)`` of the smaller Gram, p = ``2^squarings``: at most
    ``min(m, n)^(1/(2p))`` too large, cost O(m n min(m, n) + squarings min(m, n)^3).
    Why not a Lanczos/power Ritz value with a residual bound: for symmetric ``A^T A`` a residual
    only places *some* eigenvalue near the Ritz value, not the largest, so without a gap
    estimate it certifies nothing above the true norm.

    Every step is a product (no LAPACK), so the function vmaps inside programs sharded over
    several CPU devices. Cost ``O(m n (rank (2 power_steps + 3) + 2 cw_steps))`` for an m x n
    A, against ``O(m n min(m, n))`` for an exact norm. Computed in A's float dtype (at least
    float32); the result is scaled by ``1 + 4 max(m, n) eps`` to cover rounding in the
    length-``max(m, n)`` sums (Higham's ``gamma_n``; every product at full precision, see the
    module docstring), plus :func:`_flushed_norm_bound` for subnormals that XLA flushes to zero.
    Units: those of A. 0 for A = 0.
    """
    a = at_least_float32(a)
    if a.ndim != 2:
        raise ValueError(f"a must be a matrix (m, n), got shape {a.shape}; vmap over leading axes")
    rank = max(1, min(rank, *a.shape))
    raw = a
    a, c = _unit_scaled(a)
    if 2 * min(a.shape) <= max(a.shape):
        # Wide or tall: the small Gram costs O(m n min(m, n)) and its squarings are at most
        # min(m, n)^(1 / 2^(squarings + 1)) too large, so the other bounds are not needed.
        gram = _mm(a.T, a) if a.shape[1] < a.shape[0] else _mm(a, a.T)
        squared = _max_eigenvalue_upper_bound(gram, squarings)
    else:
        squared = jnp.minimum(_entrywise_norm_bounds_squared(a), _collatz_wielandt_squared(a, cw_steps))
        squared = jnp.minimum(squared, _deflated_bound_squared(a, rank, power_steps, squarings))
    finfo = jnp.finfo(a.dtype)
    margin = 1.0 + 4.0 * max(a.shape) * finfo.eps
    return c * jnp.sqrt(jnp.maximum(squared, 0.0)) * margin + _flushed_norm_bound(raw, c)


def spectral_norm(a: Any, method: str = "exact") -> jax.Array:
    """``||A||_2`` for ``method="exact"`` (``eigvalsh`` of the smaller Gram: LAPACK, map it one
    matrix at a time in sharded CPU programs), or :func:`spectral_norm_upper_bound` for
    ``"certified"`` (never below the exact value; products only, vmaps anywhere)."""
    if method == "exact":
        return _spectral_norm_exact(at_least_float32(a))
    if method == "certified":
        return spectral_norm_upper_bound(a)
    raise ValueError(f"norm method must be one of {NORM_METHODS}, got {method!r}")


def bilinear_form_norm(w_q: Any, w_k: Any) -> jax.Array:
    """``||W_K W_Q^T||_2`` for W_Q, W_K (D, Dh) without forming the D x D product.

    With ``C_K = W_K^T W_K = V diag(c) V^T`` and ``L = V diag(sqrt c)``, ``W_K = U L^T`` for some
    U with orthonormal columns, so ``||W_K W_Q^T|| = ||W_Q L||`` and its square is the largest
    eigenvalue of the Dh x Dh ``L^T (W_Q^T W_Q) L``: two Dh x Dh ``eigh`` (LAPACK: map one
    head at a time in sharded CPU programs), O(D Dh^2). Each matrix is scaled by its largest
    entry first (:func:`_unit_scaled`) and every product is at full precision.
    """
    (w_q, c_q), (w_k, c_k) = _unit_scaled(at_least_float32(w_q)), _unit_scaled(at_least_float32(w_k))
    c, v = jnp.linalg.eigh(_mm(w_k.T, w_k))
    wl = _mm(w_q, v * jnp.sqrt(jnp.maximum(c, 0.0)))
    return c_q * c_k * jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(_mm(wl.T, wl))[-1], 0.0))
