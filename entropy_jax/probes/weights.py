"""Weight-matrix spectra: spectral and Frobenius norms, stable rank, condition number (KappaTune).

Singular values are computed in float64 (eagerly, inside ``jax.enable_x64``): bf16 SVD fails and
float32 loses the smallest singular values that the condition number depends on.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from entropy_jax.probes.stats import as_float, check_finite, x64_when_eager


class MatrixSpectrum(NamedTuple):
    """Spectral summary of one weight matrix; norms in the weight's units, ratios dimensionless."""

    spectral_norm: jax.Array
    frobenius_norm: jax.Array
    stable_rank: jax.Array
    condition_number: jax.Array
    singular_values: jax.Array


@jax.jit
def _spectrum_from_matrix(w: jax.Array) -> MatrixSpectrum:
    s = jnp.linalg.svd(w, compute_uv=False)
    fro = jnp.sqrt(jnp.sum(s**2))
    return MatrixSpectrum(s[0], fro, fro**2 / s[0] ** 2, s[0] / s[-1], s)


@x64_when_eager
def matrix_spectrum(w: Any) -> MatrixSpectrum:
    """Singular values ``s`` (descending) of a 2-D weight and summaries of them.

    ``spectral_norm = s_max``, ``frobenius_norm = sqrt(sum s^2)``, ``stable_rank =
    ||W||_F^2 / ||W||_2^2``, ``condition_number = kappa = s_max / s_min`` (KappaTune, Ludwig
    2025; inf for a rank-deficient matrix). An all-zero matrix (e.g. a zero-initialised
    projection) has norms 0 and NaN stable rank and condition number: 0/0 has no limit there
    (rank-1 and identity-like matrices shrunk to zero give 1 and min(m, n)). float64 when called
    eagerly.
    """
    if np.ndim(w) != 2:
        raise ValueError(
            f"a weight matrix must be 2-D, got shape {np.shape(w)}; reshape it first "
            "(weight_spectra flattens >2-D kernels to (shape[0], -1))"
        )
    check_finite(w, "weight")
    return _spectrum_from_matrix(as_float(w))


def param_path(path: tuple) -> str:
    """'/'-joined pytree path: dict keys, attribute names and sequence indices."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def weight_spectra(params: Any, *, min_ndim: int = 2) -> dict[str, dict[str, Any]]:
    """:func:`matrix_spectrum` of every leaf of ``params`` with ``ndim >= min_ndim``.

    ``params``: any pytree of arrays (nested dict, NNX state). Keys are '/'-joined paths, e.g.
    ``"blocks/0/attn/wq/kernel"``. Leaves with more than two axes are flattened to
    ``(shape[0], -1)`` as KappaTune does; vectors and scalars (biases, norm scales) are skipped.
    Values are python floats (float64) and the numpy singular values.
    """
    out: dict[str, dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if np.ndim(leaf) < max(min_ndim, 2):
            continue
        w = np.asarray(leaf, dtype=np.float64)
        spec = matrix_spectrum(w.reshape(w.shape[0], -1))
        out[param_path(path)] = {
            "spectral_norm": float(spec.spectral_norm),
            "frobenius_norm": float(spec.frobenius_norm),
            "stable_rank": float(spec.stable_rank),
            "condition_number": float(spec.condition_number),
            "singular_values": np.asarray(spec.singular_values),
        }
    return out
