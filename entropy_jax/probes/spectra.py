"""Representation spectra of N x D activations: RankMe (two variants), von Neumann entropy, and all at once.

All functions reduce X to its D x D scatter in one (optionally sharded) pass, see
:mod:`entropy_jax.probes.stats`, then take eigenvalues. Eagerly they compute in float64 whatever
the input dtype (a float32 input gives the float64 answer for its float32 values); traced under a
caller's ``jit`` they use that trace's float dtype, and give the eager value to that dtype's
rounding. Rank <= 1 data (collapse) give each metric's limit, never an error: see
:func:`spectral_metrics`, which also fits alpha-ReQ (:mod:`entropy_jax.probes.alpha_req`) on
the same centred spectrum.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from entropy_jax.probes.alpha_req import (
    alpha_notes,
    alpha_req_from_spectrum,
    check_window,
    default_alpha_window,
    nan_fit,
)
from entropy_jax.probes.stats import (
    check_matrix,
    check_stats_finite,
    gram_eigenvalues,
    numerical_rank,
    paired_eigenvalues,
    scatter_stats,
    x64_when_eager,
)

RANKME_EPS = 1e-7  # both RankMe papers add this to every probability


def _normalised(ev: jax.Array, total: jax.Array) -> jax.Array:
    """``ev / total``; a zero spectrum becomes the one-point distribution ``e_1`` (see :func:`rankme`)."""
    one_point = jnp.zeros_like(ev).at[0].set(1.0)
    return jnp.where(total > 0, ev / jnp.where(total > 0, total, 1.0), one_point)


def _entropy_of(p: jax.Array) -> jax.Array:
    """Shannon entropy ``-sum p ln p`` in nats, with ``0 ln 0 = 0``."""
    return -jnp.sum(jax.scipy.special.xlogy(p, p))


@jax.jit
def rankme_from_singular_values(s: jax.Array) -> jax.Array:
    """Garrido et al. 2023: ``p = s / sum(s) + 1e-7``, ``exp(-sum p ln p)`` (dimensionless).

    All-zero ``s`` (all-zero data) gives the value of ``s = e_1``, about 1: see :func:`rankme`.
    """
    return jnp.exp(_entropy_of(_normalised(s, jnp.sum(s)) + RANKME_EPS))


@functools.partial(jax.jit, static_argnames="max_components")
def rankme_cov_from_eigenvalues(ev: jax.Array, max_components: int = 2048) -> jax.Array:
    """Li et al. 2025: ``q = ev / sum|ev| + 1e-7`` over the top ``max_components``, ``exp(H(q))``.

    A zero spectrum (constant data) gives the value of ``ev = e_1``, about 1: see :func:`rankme_cov`.
    """
    ev = ev[:max_components]
    return jnp.exp(_entropy_of(_normalised(ev, jnp.sum(jnp.abs(ev))) + RANKME_EPS))


@jax.jit
def von_neumann_from_eigenvalues(ev: jax.Array) -> jax.Array:
    """``S = -sum l ln l`` with ``l = ev / sum(ev)`` (eigenvalues of M / tr M), nats; 0 for a zero spectrum."""
    return _entropy_of(_normalised(ev, jnp.sum(ev)))


@x64_when_eager
def rankme(x: Any, *, mesh: Mesh | None = None) -> jax.Array:
    """RankMe of Garrido et al. 2023 ("RankMe: assessing the downstream performance ...").

    ``s`` = singular values of the *uncentred* N x D ``x`` (``sqrt`` of the eigenvalues of
    ``X^T X``, min(N, D) of them); ``p = s / sum(s) + 1e-7``; ``RankMe = exp(-sum p ln p)``.
    Dimensionless, in about [1, min(N, D)]. Rank-1 data give about 1 (``exp(H(e_1 + 1e-7))``,
    1 + about 1.6e-6 per further dimension). All-zero data have no singular value and ``p`` is
    0/0; we return the same value as for rank-1 data, the limit of a rank-1 cloud shrunk to the
    origin (RankMe is scale invariant). float64 when called eagerly; sharded over ``mesh``.
    """
    return rankme_from_singular_values(jnp.sqrt(gram_eigenvalues(x, centred=False, mesh=mesh)))


@x64_when_eager
def rankme_cov(x: Any, max_components: int = 2048, *, mesh: Mesh | None = None) -> jax.Array:
    """RankMe as computed in Li et al. 2025 ("Tracing the representation geometry of LMs").

    ``ev`` = eigenvalues of the *centred* covariance (PCA explained variances, at most
    ``max_components`` largest kept), ``q = ev / sum|ev| + 1e-7``, ``exp(-sum q ln q)``.
    Dimensionless. Differs from :func:`rankme` (uncentred, singular values, not variances).
    Rank-1 centred data give about 1. Constant rows have a zero covariance (no direction of
    variance) and ``q`` is 0/0: we return the rank-1 value, the limit of a rank-1 cloud whose
    spread shrinks to zero (``q -> e_1``: one-point distribution, entropy 0, ``exp(0 + eps terms)``).
    """
    return rankme_cov_from_eigenvalues(gram_eigenvalues(x, centred=True, mesh=mesh), max_components)


@x64_when_eager
def covariance_spectrum(x: Any, centred: bool = True, *, mesh: Mesh | None = None) -> jax.Array:
    """Normalised spectrum ``l = ev / sum(ev)`` of the (centred) scatter, descending, min(N, D) values.

    ``ev`` are eigenvalues of ``Xc^T Xc`` (``centred=True``) or ``X^T X``; ``l`` sums to 1 and is the
    spectrum alpha-ReQ fits and von Neumann entropy integrates. A zero scatter (constant rows, or
    all-zero data) gives ``e_1``, the one-point limit. Dimensionless; float64 eagerly.
    """
    ev = gram_eigenvalues(x, centred=centred, mesh=mesh)
    return _normalised(ev, jnp.sum(ev))


@x64_when_eager
def von_neumann_entropy(x: Any, centred: bool = True, *, mesh: Mesh | None = None) -> jax.Array:
    """Von Neumann (matrix) entropy ``S = -sum l ln l``, ``l`` = eigenvalues of ``M / tr M``, nats.

    ``M = Xc^T Xc`` (centred covariance) or ``X^T X`` (``centred=False``); computed on the smaller
    side (N x N dual Gram when N < D, EntropyPrune's trick). ``exp(S)`` of the centred version is
    the Tracing RankMe without its 1e-7. Identity covariance gives ``ln D``; rank <= 1 gives 0
    (for ``M = 0``, constant rows, the one-point limit ``l = e_1``). float64 eagerly.
    """
    return von_neumann_from_eigenvalues(gram_eigenvalues(x, centred=centred, mesh=mesh))


def _limit_notes(metric: str, rank: int, what: str, limit: str) -> dict[str, str]:
    """Note for a RankMe / entropy at its rank <= 1 limit (``what`` names the spectrum)."""
    if rank == 0:
        return {metric: f"zero {what} (no direction of variance): one-point limit {limit}"}
    if rank == 1:
        return {metric: f"rank-1 {what}: lower limit {limit}"}
    return {}


@x64_when_eager
def spectral_metrics(
    x: Any,
    *,
    mesh: Mesh | None = None,
    alpha_fit_range: tuple[int, int] | None = None,
    max_components: int = 2048,
) -> dict[str, Any]:
    """All representation-spectrum probes from one pass over ``x`` and one D x D tridiagonalisation.

    One (sharded) scatter pass gives count, mean and centred scatter; both spectra come from
    one shared ``sytrd`` (see :func:`~entropy_jax.probes.stats.paired_eigenvalues`). The
    uncentred spectrum (``M2 + n mu mu^T``) feeds ``rankme`` (Garrido) and ``von_neumann_entropy_uncentred``; the
    centred one feeds ``rankme_cov`` (Tracing), ``alpha_req`` / ``alpha_req_r2`` /
    ``alpha_req_r2_100`` / ``alpha_req_r2_window`` and ``von_neumann_entropy`` (nats).

    Returns python floats (float64) for those; python ints ``alpha_fit_start`` /
    ``alpha_fit_stop`` (the 0-based window; ``[0, K)`` with K < 3 when there is no default fit)
    and ``numerical_rank`` (K, centred); ``"spectrum"``: the normalised centred spectrum (numpy,
    descending; ``e_1`` for constant rows); ``"notes"``: ``{metric: one-line reason}`` for every
    metric that is NaN or at a limit (rank <= 1: RankMe ~1, entropy 0; alpha and its R^2 NaN
    below three usable eigenvalues, or when an explicit ``alpha_fit_range`` reaches past K, where
    :func:`alpha_req` would fit rounding or raise); empty when everything is regular. Never
    raises for finite data of any rank (constant rows, rank 1, zeros); raises ValueError for
    NaN/Inf input and for an explicit ``alpha_fit_range`` outside the spectrum (a configuration
    error, the same for every layer). Memory O(N D + D^2). Eager only.
    """
    check_matrix(x, values=False)
    n, d = np.shape(x)
    stats = scatter_stats(x, mesh)
    check_stats_finite(stats)
    ev_c, ev_u = paired_eigenvalues(stats, min(n, d))
    rank_c, rank_u = numerical_rank(ev_c), numerical_rank(ev_u)
    explicit = alpha_fit_range is not None
    if explicit:
        window = (int(alpha_fit_range[0]), int(alpha_fit_range[1]))
        check_window(window, len(ev_c))
        fit = nan_fit(ev_c.dtype) if window[1] > rank_c else alpha_req_from_spectrum(ev_c, window)
    else:
        window = default_alpha_window(rank_c)
        fit = alpha_req_from_spectrum(ev_c)
    notes = {
        **_limit_notes("rankme", rank_u, "data (uncentred spectrum)", "RankMe ~1"),
        **_limit_notes("rankme_cov", rank_c, "centred covariance", "RankMe ~1"),
        **_limit_notes("von_neumann_entropy", rank_c, "centred covariance", "entropy 0"),
        **_limit_notes("von_neumann_entropy_uncentred", rank_u, "data (uncentred spectrum)", "entropy 0"),
        **alpha_notes(np.asarray(ev_c), rank_c, window, explicit, fit),
    }
    return {
        "rankme": float(rankme_from_singular_values(jnp.sqrt(ev_u))),
        "rankme_cov": float(rankme_cov_from_eigenvalues(ev_c, max_components)),
        "alpha_req": float(fit.alpha),
        "alpha_req_r2": float(fit.r2),
        "alpha_req_r2_100": float(fit.r2_100),
        "alpha_req_r2_window": float(fit.r2_window),
        "alpha_fit_start": int(window[0]),
        "alpha_fit_stop": int(window[1]),
        "numerical_rank": rank_c,
        "von_neumann_entropy": float(von_neumann_from_eigenvalues(ev_c)),
        "von_neumann_entropy_uncentred": float(von_neumann_from_eigenvalues(ev_u)),
        "spectrum": np.asarray(_normalised(ev_c, jnp.sum(ev_c))),
        "notes": notes,
    }
