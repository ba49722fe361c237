"""Diffusion spectral entropy (DSE) and mutual information (DSMI), Liao, Liu et al. 2023: the exact dense path.

Exact dense algorithm of the official ``dse_dsmi`` code, arranged to need one N x N float64
buffer: the Gaussian kernel is written into it block-row-wise (per device when a mesh is given),
normalised in place, and handed to LAPACK for eigenvalues only (no eigenvectors, no copy; the
two-stage driver ``dsyevd_2stage`` when scipy's OpenBLAS exports it). The official code forms
the distance matrix, the kernel, a dense diagonal degree matrix and two N x N products (about
3.6 GB and O(N^3) extra flops at N = 10k).

Not jittable: the eigendecomposition runs on the host in float64. Inputs of any float dtype are
upcast to float64 before distances are taken.

Beyond about 10^4 rows the N x N buffer (0.8 GB at 10^4, 80 GB at 10^5) is the limit: the
matrix-free estimate and the choice between it and the exact value by size live in
:mod:`entropy_jax.probes.diffusion_slq`. :func:`median_distance` is the bandwidth rule the sweep uses.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from entropy_jax.probes.lapack import symmetric_eigvalsh_inplace
from entropy_jax.probes.stats import check_matrix
from entropy_jax.sharding import DATA_AXIS, data_sharding, replicated

FLOAT64_EPS = float(np.finfo(np.float64).eps)  # the official code adds this to every probability


def _gaussian_rows_numpy(xq: np.ndarray, x: np.ndarray, sq: np.ndarray, sigma: float) -> np.ndarray:
    """``exp(-|q - x|^2 / (2 sigma^2))`` for a block of query rows, float64."""
    d2 = (xq * xq).sum(1)[:, None] + sq[None, :] - 2.0 * (xq @ x.T)
    np.maximum(d2, 0.0, out=d2)
    d2 *= -1.0 / (2.0 * sigma**2)
    return np.exp(d2, out=d2)


@functools.cache
def _gaussian_rows_sharded(mesh: Mesh) -> Callable[..., jax.Array]:
    """jit(shard_map): each device computes the kernel rows of its slice of query rows."""

    def per_device(xq: jax.Array, x: jax.Array, sigma: jax.Array) -> jax.Array:
        d2 = jnp.sum(xq * xq, 1)[:, None] + jnp.sum(x * x, 1)[None, :] - 2.0 * (xq @ x.T)
        return jnp.exp(-jnp.maximum(d2, 0.0) / (2.0 * sigma**2))

    spec = P(DATA_AXIS)
    # Replicated out: every process can read the block (a row block spans other processes' devices).
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec),
                   out_shardings=replicated(mesh))


def gaussian_kernel(x: np.ndarray, sigma: float, *, mesh: Mesh | None = None, block: int = 1024) -> np.ndarray:
    """Dense N x N Gaussian kernel ``G_ij = exp(-|x_i - x_j|^2 / (2 sigma^2))`` in float64.

    Filled block-row-wise into one host buffer; with a mesh each block of ``block`` rows per device
    is computed on the devices (``P("data")`` over rows, all of ``x`` replicated).
    """
    n = x.shape[0]
    out = np.empty((n, n), dtype=np.float64)
    if mesh is None:
        sq = (x * x).sum(1)
        for r0 in range(0, n, block):
            out[r0 : r0 + block] = _gaussian_rows_numpy(x[r0 : r0 + block], x, sq, sigma)
        return out
    rows = block * mesh.shape[DATA_AXIS]
    fn = _gaussian_rows_sharded(mesh)
    with jax.enable_x64(True):
        x_all = jax.device_put(np.asarray(x, np.float64), replicated(mesh))
        sig = jax.device_put(np.float64(sigma), replicated(mesh))
        for r0 in range(0, n, rows):
            xq = x[r0 : r0 + rows]
            xq = np.concatenate([xq, np.zeros((rows - len(xq), x.shape[1]))]) if len(xq) < rows else xq
            blk = fn(jax.device_put(xq, data_sharding(mesh)), x_all, sig)
            out[r0 : r0 + rows] = np.asarray(blk)[: min(rows, n - r0)]
    return out


def diffusion_eigenvalues(x: np.ndarray, sigma: float, *, mesh: Mesh | None = None) -> np.ndarray:
    """Eigenvalues of ``K = D^-1/2 G D^-1/2``, ``D = diag(G 1)`` (same as those of ``D^-1 G``)."""
    k = gaussian_kernel(x, sigma, mesh=mesh)
    inv_sqrt_deg = 1.0 / np.sqrt(k.sum(axis=1))
    k *= inv_sqrt_deg[:, None]
    k *= inv_sqrt_deg[None, :]
    return symmetric_eigvalsh_inplace(k)


def dse_from_eigenvalues(eigenvalues: np.ndarray, t: int = 1) -> float:
    """``lam = |eig|^t``, ``p = lam / sum(lam) + eps64``, ``DSE = -sum p log2 p`` (bits)."""
    lam = np.abs(np.asarray(eigenvalues, dtype=np.float64)) ** t
    p = lam / lam.sum() + FLOAT64_EPS
    return float(-np.sum(p * np.log2(p)))


def as_samples(x: Any) -> np.ndarray:
    """``x`` checked to be a finite N x D matrix with N >= 2, as float64 numpy."""
    check_matrix(x)
    return np.asarray(x, dtype=np.float64)


def diffusion_spectral_entropy(
    x: Any,
    sigma: float = 10.0,
    t: int = 1,
    max_samples: int | None = 10_000,
    seed: int | None = 0,
    *,
    mesh: Mesh | None = None,
) -> float:
    """Diffusion spectral entropy of N x D ``x`` in **bits** (Liao, Liu et al. 2023).

    ``G = exp(-d^2 / (2 sigma^2))`` (Euclidean ``d`` in raw feature units, fixed ``sigma``),
    ``K = D^-1/2 G D^-1/2``, eigenvalues ``lam`` of K, ``p = |lam|^t / sum + 2.22e-16``,
    ``DSE = -sum p log2 p``; at most ``log2 N``. Not scale invariant and grows with N: compare
    only at equal N and sigma. When N > ``max_samples``, the rows used are exactly the official
    code's: ``random.seed(seed); random.sample(range(N), k=max_samples)`` (Python ``random``).
    Exact (dense) in float64, O(N^2) memory and O(N^3) time; with a mesh the kernel rows are
    computed sharded over its ``data`` axis.
    """
    return dse_from_eigenvalues(diffusion_eigenvalues(dse_sample(x, max_samples, seed), sigma, mesh=mesh), t)


def dse_sample(x: Any, max_samples: int | None, seed: int | None = 0) -> np.ndarray:
    """The rows DSE uses, float64: all of ``x`` when N <= ``max_samples`` (or it is None), else
    the official code's draw ``random.seed(seed); random.sample(range(N), k=max_samples)``."""
    x = as_samples(x)
    if max_samples is not None and len(x) > max_samples:
        x = x[np.array(random.Random(seed).sample(range(len(x)), k=max_samples))]
    return x


def median_distance(x: Any, max_rows: int = 2048, seed: int | None = 0) -> float:
    """Median Euclidean distance over all distinct pairs of rows of ``x``, in feature units (float64).

    With more than ``max_rows`` rows, over the pairs of :func:`dse_sample` ``(x, max_rows, seed)``.
    The median heuristic for kernel bandwidths (Schoelkopf & Smola 2002; Gretton et al. 2012): with
    ``sigma = median_distance(x)`` a typical pair has ``G_ij = exp(-1/2)``, so DSE at that sigma is
    invariant to rescaling x and is comparable across checkpoints whose scales differ.
    """
    x = dse_sample(x, max_rows, seed)
    x = x - x.mean(axis=0)  # distances are translation invariant; centring avoids cancellation
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    return float(np.median(np.sqrt(np.maximum(d2[np.triu_indices(len(x), 1)], 0.0))))


def _classes(labels: Any, n: int, num_bins: int) -> np.ndarray:
    """Integer labels as they are; continuous scalars min-max scaled into ``num_bins`` bins.

    Constant continuous labels are one class (the min-max scaling would be 0/0).
    """
    y = np.asarray(labels).reshape(-1) if np.ndim(labels) == 2 and np.shape(labels)[1] == 1 else labels
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != n:
        raise ValueError(
            f"labels must be a 1-D array with one entry per row of x ({n}), got shape {np.shape(labels)}"
        )
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        return y
    if not np.all(np.isfinite(y)):
        raise ValueError("labels contain NaN or Inf; continuous labels must be finite to be binned")
    if y.max() == y.min():  # constant labels: one class (DSMI 0), not 0/0
        return np.zeros(len(y), dtype=np.int64)
    scaled = (y - y.min()) / (y.max() - y.min())
    return np.digitize(scaled, bins=np.linspace(0, 1, num_bins + 1)[:-1])


def diffusion_spectral_mutual_information(
    x: Any,
    labels: Any,
    sigma: float = 10.0,
    t: int = 1,
    num_repetitions: int = 5,
    seed: int | None = 0,
    num_bins: int = 10,
    *,
    mesh: Mesh | None = None,
) -> float:
    """Diffusion spectral mutual information ``I(X; Y)`` in **bits** (Liao, Liu et al. 2023).

    ``DSMI = sum_c (n_c / N) [mean_{5 subsets S, |S| = n_c} DSE(X_S) - DSE(X[y == c])]``.
    Integer labels are classes; float labels are min-max scaled and put in ``num_bins`` bins
    (the official scalar binning). Random subsets reproduce the official draws exactly: Python
    ``random`` re-seeded with ``seed`` for every class, then ``random.sample(range(N), k=n_c)``
    ``num_repetitions`` times, so values match the official code to float64 rounding.
    """
    x = as_samples(x)
    y = _classes(labels, len(x), num_bins)
    classes, counts = np.unique(y, return_counts=True)
    gains = []
    for c, n_c in zip(classes, counts, strict=True):
        h_class = diffusion_spectral_entropy(x[y == c], sigma, t, mesh=mesh)
        rng = random.Random(seed)
        h_rand = [
            diffusion_spectral_entropy(x[np.array(rng.sample(range(len(x)), k=int(n_c)))], sigma, t, mesh=mesh)
            for _ in range(num_repetitions)
        ]
        gains.append(np.mean(h_rand) - h_class)
    return float(np.sum(counts / counts.sum() * np.array(gains)))
