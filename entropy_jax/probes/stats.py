"""Numerics shared by the probes: float64 dispatch, input checks, sharded scatter statistics, numerical rank.

float64 policy: the training code runs without ``jax_enable_x64``. Every probe that promises
float64 accuracy is wrapped in :func:`x64_when_eager`: called on concrete arrays it runs inside
``jax.enable_x64(True)`` and upcasts its input to float64, so a float32 input gives the exact
float64 answer for those float32 values. Traced under a caller's ``jax.jit`` it runs in the
default float dtype of that trace (float32 unless the caller enabled x64).

Scatter statistics: each device of the mesh's ``data`` axis reduces its rows to a count, a mean
and a *centred* scatter; the pieces are merged with the k-way form of Chan et al.'s parallel
update (Chan, Golub & LeVeque 1979), ``M2 = sum_i [M2_i + n_i (mu_i - mu)(mu_i - mu)^T]``,
inside ``jax.shard_map`` with ``psum``. Nothing of the form ``X^T X / N - mu mu^T`` is ever
formed, so large activation means cause no cancellation.

Numerical rank: the count of eigenvalues above ``max(1e-9, 100 eps)`` of the largest, where
alpha-ReQ windows and R^2 ranges stop and the RankMe / entropy limits are read
(:func:`numerical_rank`, traceable :func:`rank_count`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from entropy_jax.probes.lapack import tridiagonalise_inplace
from entropy_jax.sharding import DATA_AXIS, data_sharding

F = TypeVar("F", bound=Callable[..., Any])


def is_traced(*trees: Any) -> bool:
    """True when any leaf is a tracer (we are inside a caller's ``jit``/``vmap``)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def x64_when_eager(fn: F) -> F:
    """Run ``fn`` under ``jax.enable_x64(True)`` unless it is being traced."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if is_traced(args, kwargs):
            return fn(*args, **kwargs)
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def as_float(x: Any) -> jax.Array:
    """``x`` as the widest float available (float64 inside :func:`x64_when_eager`)."""
    return jnp.asarray(x, dtype=jnp.result_type(float))


def at_least_float32(x: Any) -> jax.Array:
    """``x`` as an array of its own float dtype, at least float32 (bf16/f16 and ints upcast)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_finite(x: Any, name: str = "x") -> None:
    """Raise ValueError on NaN/Inf (skipped while tracing, where values are unknown)."""
    if is_traced(x):
        return
    if not bool(jnp.all(jnp.isfinite(jnp.asarray(x)))):
        raise ValueError(
            f"{name} contains NaN or Inf values; probes need finite inputs "
            "(check the model for divergence, or drop the offending rows before probing)"
        )


def check_matrix(x: Any, name: str = "x", min_rows: int = 2, values: bool = True) -> None:
    """Raise ValueError unless ``x`` is a 2-D (N x D) array with N >= ``min_rows`` (and finite).

    ``values=False`` skips the O(N D) finiteness pass: callers that reduce ``x`` to scatter
    statistics check those instead (any NaN/Inf in ``x`` makes the mean and scatter non-finite).
    """
    shape = np.shape(x)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must be a 2-D array (N samples x D features), got shape {shape}; "
            "reshape e.g. (batch, seq, d) activations with x.reshape(-1, d)"
        )
    if shape[0] < min_rows or shape[1] < 1:
        raise ValueError(
            f"{name} has shape {shape}: need at least {min_rows} samples (rows) and one feature"
        )
    if values:
        check_finite(x, name)


class ScatterStats(NamedTuple):
    """Row count ``n``, mean ``mean`` (D,) and centred scatter ``m2`` (D, D) of N x D data."""

    n: jax.Array
    mean: jax.Array
    m2: jax.Array

    def uncentred(self) -> jax.Array:
        """``X^T X = M2 + n mu mu^T`` (a sum of PSD terms: no cancellation)."""
        return self.m2 + self.n * jnp.outer(self.mean, self.mean)


def _symmetric_gram(xc: jax.Array, block: int = 512) -> jax.Array:
    """``xc^T xc`` from its lower block triangle only (XLA has no ``syrk``): ~5/8 of the flops at D = 2048."""
    d = xc.shape[1]
    if d <= block:
        return xc.T @ xc
    cols = [xc[:, i : i + block] for i in range(0, d, block)]
    lower = [[cols[i].T @ cols[j] for j in range(i + 1)] for i in range(len(cols))]
    rows = [
        jnp.concatenate([lower[i][j] if j <= i else lower[j][i].T for j in range(len(cols))], axis=1)
        for i in range(len(cols))
    ]
    return jnp.concatenate(rows, axis=0)


def _local_moments(x: jax.Array, w: jax.Array) -> ScatterStats:
    """Count, mean and centred scatter of the rows of ``x`` with 0/1 weights ``w``."""
    n = jnp.sum(w)
    mean = (w @ x) / jnp.maximum(n, 1.0)
    xc = (x - mean) * w[:, None]
    return ScatterStats(n, mean, _symmetric_gram(xc))


def _merge_over_axis(local: ScatterStats, axis: str) -> ScatterStats:
    """k-way Chan merge of per-device moments with ``psum`` over ``axis``."""
    n = jax.lax.psum(local.n, axis)
    mean = jax.lax.psum(local.n * local.mean, axis) / n
    delta = local.mean - mean
    m2 = jax.lax.psum(local.m2 + local.n * jnp.outer(delta, delta), axis)
    return ScatterStats(n, mean, m2)


@functools.cache
def _sharded_moments_fn(mesh: Mesh) -> Callable[[jax.Array, jax.Array], ScatterStats]:
    def per_device(x: jax.Array, w: jax.Array) -> ScatterStats:
        return _merge_over_axis(_local_moments(x, w), DATA_AXIS)

    spec = P(DATA_AXIS)
    return jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(spec, spec), out_specs=P()))


@jax.jit
def _single_moments(x: jax.Array) -> ScatterStats:
    return _local_moments(x, jnp.ones(x.shape[0], x.dtype))


def _host_moments(x: np.ndarray) -> ScatterStats:
    """Host (numpy) data without a mesh: centre, then one BLAS ``syrk`` (numpy's ``xc.T @ xc``)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite input is reported by the caller
        mean = x.mean(axis=0)
        xc = x - mean
        m2 = xc.T @ xc
    return ScatterStats(jnp.asarray(float(len(x))), jnp.asarray(mean), jnp.asarray(m2))


def check_stats_finite(stats: ScatterStats, name: str = "x") -> None:
    """Raise ValueError when the scatter statistics of ``name`` are not finite (NaN/Inf rows)."""
    if not is_traced(stats) and not (np.isfinite(np.asarray(stats.m2)).all() and np.isfinite(stats.mean).all()):
        raise ValueError(
            f"{name} contains NaN or Inf values (or values whose squares overflow float64); probes need "
            "finite inputs (check the model for divergence, or drop the offending rows before probing)"
        )


@x64_when_eager
def scatter_stats(x: Any, mesh: Mesh | None = None) -> ScatterStats:
    """One pass over N x D ``x``: count, mean and centred scatter, sharded over ``mesh``.

    Host numpy data without a mesh takes :func:`_host_moments` (BLAS ``syrk``: XLA's CPU backend
    has none). With a mesh, rows are padded with zero-weight rows to a multiple of the ``data`` axis size,
    placed with ``P("data")``, and each device reduces its own rows before the Chan merge.
    float64 when called eagerly (whatever the input dtype); the trace's float dtype under jit.
    """
    if mesh is None and isinstance(x, np.ndarray):
        return _host_moments(x)
    x = as_float(x)
    if mesh is None:
        return _single_moments(x)
    num_shards = mesh.shape[DATA_AXIS]
    pad = -x.shape[0] % num_shards
    w = jnp.concatenate([jnp.ones(x.shape[0], x.dtype), jnp.zeros(pad, x.dtype)])
    x = jnp.concatenate([x, jnp.zeros((pad, x.shape[1]), x.dtype)])
    if not is_traced(x):
        x, w = jax.device_put((x, w), data_sharding(mesh))
    return _sharded_moments_fn(mesh)(x, w)


def descending_eigvalsh(m: jax.Array, keep: int) -> jax.Array:
    """The ``keep`` largest eigenvalues of symmetric ``m``, descending, clipped at 0.

    Eagerly this is LAPACK ``syevd`` on the host in float64 (numpy): far faster than XLA's CPU
    ``eigh`` and exact to float64 whatever the device. Traced, it is ``jnp.linalg.eigvalsh``.
    """
    if is_traced(m):
        ev = jnp.linalg.eigvalsh(m)
    else:
        ev = jnp.asarray(np.linalg.eigvalsh(np.asarray(m, dtype=np.float64)))
    return jnp.maximum(ev[::-1][:keep], 0.0)


def paired_eigenvalues(stats: ScatterStats, keep: int) -> tuple[jax.Array, jax.Array]:
    """Descending eigenvalues of the centred scatter ``M2`` and of ``X^T X = M2 + n mu mu^T``.

    Eagerly this costs one tridiagonalisation, not two: a Householder reflection H with
    ``H mu = -+|mu| e1`` turns both matrices into ``A = H M2 H`` and ``A + n |mu|^2 e1 e1^T``,
    which differ only in entry (0, 0). LAPACK's lower tridiagonalisation (two-stage where
    available, :func:`~entropy_jax.probes.lapack.tridiagonalise_inplace`) never mixes row/column
    0 into its reflectors, so both tridiagonal forms share everything but ``T[0, 0]``; two O(D^2)
    ``sterf`` solves then give both spectra (float64, host). Traced: two ``eigvalsh``.
    """
    if is_traced(stats):
        return descending_eigvalsh(stats.m2, keep), descending_eigvalsh(stats.uncentred(), keep)
    m2, mu = np.asarray(stats.m2, np.float64), np.asarray(stats.mean, np.float64)
    norm = float(np.linalg.norm(mu))
    v = mu.copy()
    v[0] += np.copysign(norm, mu[0])
    vv = float(v @ v)
    if vv == 0.0:
        ev = descending_eigvalsh(jnp.asarray(m2), keep)
        return ev, ev
    p = (2.0 / vv) * (m2 @ v)
    q = p - (float(v @ p) / vv) * v
    a = m2 - np.outer(v, q) - np.outer(q, v)
    diag, off = tridiagonalise_inplace(np.ascontiguousarray(a))

    def spectrum(d: np.ndarray) -> jax.Array:
        ev = scipy.linalg.eigvalsh_tridiagonal(d, off, lapack_driver="sterf")
        return jnp.maximum(jnp.asarray(np.sort(ev)[::-1][:keep].copy()), 0.0)

    uncentred_diag = diag.copy()
    uncentred_diag[0] += float(stats.n) * norm**2
    return spectrum(diag), spectrum(uncentred_diag)


@x64_when_eager
def gram_eigenvalues(x: Any, *, centred: bool, mesh: Mesh | None = None) -> jax.Array:
    """Eigenvalues of ``X^T X`` (or of the centred scatter), descending, ``min(N, D)`` of them.

    These are the squared singular values of (centred) X. When N < D and no mesh is given, the
    N x N dual Gram ``X X^T`` is used instead (same nonzero spectrum, EntropyPrune's trick);
    otherwise the D x D scatter from :func:`scatter_stats`. Not normalised; units of x^2.
    """
    check_matrix(x, values=False)
    n, d = np.shape(x)
    if n < d and mesh is None:
        check_finite(x)
        x = as_float(x)
        if centred:
            x = x - jnp.mean(x, axis=0)
        return descending_eigvalsh(x @ x.T, n)
    stats = scatter_stats(x, mesh)
    check_stats_finite(stats)
    return descending_eigvalsh(stats.m2 if centred else stats.uncentred(), min(n, d))


NULL_EIGENVALUE_RTOL = 1e-9
NULL_EIGENVALUE_EPS = 100  # in a float32 Gram, eigenvalues below 100 eps of the largest are rounding


def null_eigenvalue_rtol(dtype: Any) -> float:
    """Numerical-rank threshold: ``max(1e-9, 100 eps)`` (1e-9 in float64, 1.2e-5 in float32).

    A float32 Gram (a caller's float32 ``jit``) puts an exact null direction at about 1e-7 of the
    largest eigenvalue, above the float64 threshold 1e-9; the floor of 100 eps keeps it out there
    too. Genuine eigenvalues that small cannot be told from rounding in float32, so a float32
    trace agrees with the eager (float64) alpha only for spectra above 1.2e-5 of the largest; run
    the trace under ``jax.enable_x64(True)`` for the float64 window.
    """
    return max(NULL_EIGENVALUE_RTOL, NULL_EIGENVALUE_EPS * float(jnp.finfo(dtype).eps))


def rank_count(ev: jax.Array) -> jax.Array:
    """Traceable :func:`numerical_rank`: eigenvalues above ``null_eigenvalue_rtol`` x the largest."""
    return jnp.sum(ev > null_eigenvalue_rtol(ev.dtype) * ev[0])


def numerical_rank(ev: Any, rtol: float | None = None) -> int:
    """Number of eigenvalues above ``rtol`` x the largest (``ev`` descending); 0 for a zero spectrum.

    ``rtol`` defaults to :func:`null_eigenvalue_rtol` of ``ev``'s dtype (1e-9 in float64).
    A LayerNorm output has an exact null direction (its features sum to zero); float rounding
    turns it into an eigenvalue about 1e-13 (float64) or 1e-7 (float32) of the largest. A power
    law fitted through that eigenvalue measures rounding, not geometry, so default windows stop
    at the numerical rank. Eager (returns an int); traced code counts the same inside the trace.
    """
    ev = np.asarray(ev)
    rtol = null_eigenvalue_rtol(ev.dtype) if rtol is None else rtol
    return int(np.sum(ev > rtol * ev[0]))
