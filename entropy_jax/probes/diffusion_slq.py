"""Matrix-free estimate of diffusion spectral entropy for large N: stochastic Lanczos quadrature (SLQ).

:func:`diffusion_spectral_entropy_slq` estimates the DSE of :mod:`entropy_jax.probes.diffusion`
without the N x N kernel (kernel tiles built on the fly, memory O(N (d + probes))), with its
error estimate in :class:`DSEEstimate`; :func:`dse_estimate` picks the exact or the estimated
path by size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import Mesh

from entropy_jax.probes.diffusion import as_samples, diffusion_spectral_entropy


@dataclasses.dataclass(frozen=True)
class DSEEstimate:
    """A DSE value in bits and how it was obtained (``method`` "exact" or "slq", ``n`` rows).

    For "slq": ``stderr`` is the standard error (bits) of the stochastic trace estimate, from the
    spread of the per-probe estimates; ``quadrature_halfgap`` is half the gap (bits) between the
    Gauss and Gauss-Radau rules, which bracket the value for t = 1 (both 0 for "exact").
    """

    bits: float
    method: str
    n: int
    stderr: float = 0.0
    quadrature_halfgap: float = 0.0

    def note(self) -> str:
        """One line for the results table's ``note`` column."""
        if self.method == "exact":
            return f"exact, N={self.n}"
        return (f"slq, N={self.n}: standard error {self.stderr:.2g} bits, "
                f"quadrature half-gap {self.quadrature_halfgap:.2g} bits")


@functools.partial(jax.jit, static_argnames=("tile", "dtype"))
def _gaussian_apply(x_NxD: jax.Array, w_NxP: jax.Array, scale: jax.Array, tile: int, dtype: Any) -> jax.Array:
    """``G @ w``, ``G_ij = exp(-scale |x_i - x_j|^2)``, built ``tile`` rows at a time (never N x N).

    Distances and exponentials in ``dtype``; the product accumulates in float64.
    """
    n, d = x_NxD.shape
    x, w = x_NxD.astype(dtype), w_NxP.astype(dtype)
    sq = jnp.sum(x * x, 1)

    def rows(args: tuple[jax.Array, jax.Array]) -> jax.Array:
        x_tile, sq_tile = args
        d2 = sq_tile[:, None] + sq[None, :] - 2.0 * (x_tile @ x.T)
        g = jnp.exp(jnp.maximum(d2, 0.0) * (-scale).astype(dtype))
        return jnp.dot(g, w, preferred_element_type=jnp.float64)

    out = jax.lax.map(rows, (x.reshape(n // tile, tile, d), sq.reshape(n // tile, tile)))
    return out.reshape(n, w_NxP.shape[1]).astype(jnp.float64)


def _apply_k(x: jax.Array, s: jax.Array, v: jax.Array, scale: jax.Array, tile: int, dtype: Any) -> jax.Array:
    """``K v = D^-1/2 G D^-1/2 v`` with ``s = D^-1/2`` (0 on padding rows)."""
    return s[:, None] * _gaussian_apply(x, s[:, None] * v, scale, tile, dtype)


@functools.partial(jax.jit, static_argnames=("tile", "dtype", "iterations"))
def _top_subspace(x: jax.Array, s: jax.Array, omega: jax.Array, scale: jax.Array, tile: int, dtype: Any,
                  iterations: int) -> jax.Array:
    """Orthonormal basis of ``K^iterations omega`` (subspace iteration): K's leading eigenvectors."""
    q = jnp.linalg.qr(omega)[0]
    for _ in range(iterations):
        q = jnp.linalg.qr(_apply_k(x, s, q, scale, tile, dtype))[0]
    return q


@functools.partial(jax.jit, static_argnames=("tile", "dtype", "steps"))
def _lanczos(x: jax.Array, s: jax.Array, v0: jax.Array, scale: jax.Array, tile: int, dtype: Any,
             steps: int) -> tuple[jax.Array, jax.Array]:
    """``steps`` Lanczos steps of K from every column of ``v0`` at once: (alphas, betas), steps x P.

    No reorthogonalisation: Gauss quadrature stays accurate without it (Golub & Meurant 2010), and
    memory stays O(N P). After a breakdown (beta below tolerance) the column's vectors are zero.
    """
    tol = 100.0 * float(jnp.finfo(dtype).eps)

    def step(carry: tuple, _: None) -> tuple:
        q_prev, q, beta_prev = carry
        w = _apply_k(x, s, q, scale, tile, dtype) - beta_prev * q_prev
        alpha = jnp.sum(w * q, 0)
        w = w - alpha * q
        beta = jnp.linalg.norm(w, axis=0)
        ok = beta > tol
        q_next = jnp.where(ok, w / jnp.where(ok, beta, 1.0), 0.0)
        return (q, q_next, jnp.where(ok, beta, 0.0)), (alpha, jnp.where(ok, beta, 0.0))

    q0 = v0 / jnp.linalg.norm(v0, axis=0)
    _, (alphas, betas) = jax.lax.scan(step, (jnp.zeros_like(q0), q0, jnp.zeros(q0.shape[1])), None, length=steps)
    return alphas, betas


def _f_g(nodes: np.ndarray, weights: np.ndarray, t: int) -> tuple[float, float]:
    """Quadrature of ``f = |l|^t`` and ``g = |l|^t ln |l|^t`` (g(0) = 0)."""
    lam = np.abs(nodes) ** t
    g = lam * np.log(np.where(lam > 0, lam, 1.0))
    return float(weights @ lam), float(weights @ g)


def _quadrature(alpha: np.ndarray, beta: np.ndarray, t: int) -> tuple[float, float, float]:
    """``(f, g, g_radau)`` of ``q^T f(K) q`` for the unit start vector of one Lanczos run.

    Gauss rule: the eigenpairs of the tridiagonal T_m (nodes; squared first components as weights).
    Gauss-Radau with a node fixed at 0 <= lambda_min(K) (Golub & Meurant 2010, Sec. 6.2): T_m
    extended by ``beta_m`` and ``alpha' = delta_m``, where ``T_m delta = beta_m^2 e_m``. For
    ``g = l ln l`` (even derivatives > 0, odd ones < 0) Gauss is below and Radau above the value.
    """
    stop = np.flatnonzero(beta == 0.0)
    m = int(stop[0]) + 1 if len(stop) else len(alpha)
    nodes, vectors = scipy.linalg.eigh_tridiagonal(alpha[:m], beta[: m - 1])
    f, g = _f_g(nodes, vectors[0] ** 2, t)
    if len(stop):  # Krylov space exhausted: the Gauss rule is exact
        return f, g, g
    t_m = np.diag(alpha[:m]) + np.diag(beta[: m - 1], 1) + np.diag(beta[: m - 1], -1)
    e_m = np.zeros(m)
    e_m[-1] = beta[m - 1] ** 2
    delta = np.linalg.solve(t_m, e_m)
    nodes_r, vectors_r = scipy.linalg.eigh_tridiagonal(np.append(alpha[:m], delta[-1]), beta[:m])
    _, g_radau = _f_g(np.maximum(nodes_r, 0.0), vectors_r[0] ** 2, t)
    return f, g, g_radau if np.isfinite(g_radau) else g


def _entropy_bits(trace_f: float, trace_g: float) -> float:
    """``-sum p log2 p`` with ``p = f(lam) / tr f(K)``: ``(ln S - tr g(K) / S) / ln 2``."""
    return (math.log(trace_f) - trace_g / trace_f) / math.log(2.0)


def diffusion_spectral_entropy_slq(
    x: Any,
    sigma: float = 10.0,
    t: int = 1,
    *,
    num_probes: int = 32,
    deflation_rank: int = 32,
    lanczos_steps: int = 32,
    power_iterations: int = 2,
    seed: int | None = 0,
    tile: int = 256,
    tile_dtype: Any = jnp.float64,
) -> DSEEstimate:
    """Diffusion spectral entropy (bits) of all rows of N x D ``x``, estimated without the N x N kernel.

    Same quantity as :func:`diffusion_spectral_entropy` (up to its 2.22e-16 per probability, which
    moves the value by less than N * 1e-14 bits). With ``S = tr f(K)``, ``f(l) = |l|^t`` and
    ``g(l) = f(l) ln f(l)``: ``DSE = (ln S - tr g(K) / S) / ln 2``. K is positive semi-definite
    (a Gaussian kernel, congruently scaled), so S is exact for t = 1 (``tr K = sum_i 1 / D_ii``) and
    t = 2 (``||K||_F^2``, one product with the kernel ``G**2``); other t estimate it too.
    ``tr g(K)`` is Hutch++-style stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Meyer et
    al. 2021): a rank-``deflation_rank`` basis Q of K's top eigenvectors (subspace iteration) is
    quadrature-evaluated exactly, ``num_probes`` Rademacher probes projected off Q give the rest;
    all columns run ``lanczos_steps`` Lanczos steps together. Every product ``K V`` builds G in
    ``tile``-row blocks on the fly (distances and exponentials in ``tile_dtype``, sums in float64;
    float32 is faster but its 1e-7 rounding of every kernel entry shows when the entropy sits in
    eigenvalues below about 1e-6, as with wide kernels: 7e-4 bits at N = 500, sigma = 10), so
    memory is O(N (D + rank + probes)) plus one tile x N block. Error estimate: ``stderr`` from the
    spread of the probe estimates (delta method); ``quadrature_halfgap`` from the Gauss and
    Gauss-Radau rules, whose midpoint is returned. Compiled once per (N rounded up to ``tile``, D).
    """
    x = as_samples(x)
    if sigma <= 0 or t < 1 or int(t) != t:
        raise ValueError(f"DSE needs sigma > 0 and an integer diffusion time t >= 1, got sigma={sigma}, t={t}")
    rng = np.random.default_rng(seed)
    rank = min(deflation_rank, len(x) // 4)
    alphas, betas, norms2, trace_f = _slq_lanczos(x, sigma, t, rng, rank, num_probes, lanczos_steps,
                                                  power_iterations, tile, tile_dtype)
    quad = np.array([_quadrature(a, b, t) for a, b in zip(alphas.T, betas.T, strict=True)]) * norms2[:, None]
    (f_q, g_q, r_q), probe = quad[:rank].sum(0), quad[rank:]
    trace_f = f_q + probe[:, 0].mean() if math.isnan(trace_f) else trace_f
    trace_g, trace_r = g_q + probe[:, 1].mean(), r_q + probe[:, 2].mean()
    gauss, radau = _entropy_bits(trace_f, trace_g), _entropy_bits(trace_f, trace_r)
    # Delta method: d DSE = (dS (1/S + T/S^2) - dT / S) / ln 2, T = tr g(K); dS = 0 where S is exact.
    d_s = probe[:, 0] if t > 2 else np.zeros(len(probe))
    influence = (d_s * (1.0 / trace_f + trace_g / trace_f**2) - probe[:, 1] / trace_f) / math.log(2.0)
    stderr = float(np.std(influence, ddof=1) / math.sqrt(len(probe))) if len(probe) > 1 else math.nan
    return DSEEstimate(bits=(gauss + radau) / 2, method="slq", n=len(x), stderr=stderr,
                       quadrature_halfgap=abs(gauss - radau) / 2)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((rows - len(a), a.shape[1]))]) if rows > len(a) else a


def _slq_lanczos(x: np.ndarray, sigma: float, t: int, rng: np.random.Generator, rank: int, num_probes: int,
                 steps: int, power_iterations: int, tile: int, tile_dtype: Any) -> tuple:
    """The device part of the SLQ estimate: Lanczos coefficients (steps x (rank + probes)) of the
    deflation basis and the projected probes, their squared norms, and S = tr f(K) where exact."""
    n, n_pad = len(x), -(-len(x) // tile) * tile
    x_pad = _pad_rows(x - x.mean(axis=0), n_pad)  # centring: no cancellation in |x_i|^2 + |x_j|^2 - 2 x_i.x_j
    real = (np.arange(n_pad) < n).astype(np.float64)[:, None]  # padding rows get s = 0: K is 0 there
    with jax.enable_x64(True):
        xs, scale = jnp.asarray(x_pad), jnp.asarray(1.0 / (2.0 * sigma**2))
        degree = _gaussian_apply(xs, jnp.asarray(real), scale, tile, tile_dtype)[:, 0]
        s = jnp.where(jnp.asarray(real[:, 0]) > 0, 1.0 / jnp.sqrt(jnp.where(real[:, 0] > 0, degree, 1.0)), 0.0)
        z = jnp.asarray(_pad_rows(rng.choice([-1.0, 1.0], size=(n, num_probes)), n_pad))
        if rank:
            q = _top_subspace(xs, s, jnp.asarray(_pad_rows(rng.standard_normal((n, rank)), n_pad)), scale, tile,
                              tile_dtype, power_iterations)
            z = jnp.concatenate([q, z - q @ (q.T @ z)], axis=1)
        alphas, betas = _lanczos(xs, s, z, scale, tile, tile_dtype, steps)
        if t == 1:  # tr K = sum_i G_ii / D_ii
            trace_f = float(jnp.sum(s**2))
        elif t == 2:  # ||K||_F^2 = (s^2)^T (G * G) s^2, and G * G is the kernel at 2 x scale
            trace_f = float(jnp.sum(s**2 * _gaussian_apply(xs, (s**2)[:, None], 2.0 * scale, tile, tile_dtype)[:, 0]))
        else:
            trace_f = math.nan
        return np.asarray(alphas), np.asarray(betas), np.asarray(jnp.sum(z**2, axis=0)), trace_f


EXACT_MAX_SAMPLES = 8192  # above this many rows, dse_estimate uses the SLQ estimate


def dse_estimate(
    x: Any, sigma: float, t: int = 1, *, exact_max: int = EXACT_MAX_SAMPLES, seed: int | None = 0,
    mesh: Mesh | None = None,
) -> DSEEstimate:
    """DSE (bits) of all rows of ``x``: exact (dense, :func:`diffusion_spectral_entropy`) when
    N <= ``exact_max``, else :func:`diffusion_spectral_entropy_slq` (seeded with ``seed``)."""
    x = as_samples(x)
    if len(x) > exact_max:
        return diffusion_spectral_entropy_slq(x, sigma, t, seed=seed)
    return DSEEstimate(diffusion_spectral_entropy(x, sigma, t, max_samples=None, mesh=mesh), "exact", len(x))
