"""Representation spectra of N x D activations: RankMe (two variants), alpha-ReQ, von Neumann entropy.

All functions reduce X to its D x D scatter in one (optionally sharded) pass, see
:mod:`entropy_jax.probes.stats`, then take eigenvalues. Eagerly they compute in float64 whatever
the input dtype (a float32 input gives the float64 answer for its float32 values); traced under a
caller's ``jit`` they use that trace's float dtype. Definitions follow ``METRICS.md``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from entropy_jax.probes.stats import (
    check_matrix,
    check_stats_finite,
    gram_eigenvalues,
    is_traced,
    paired_eigenvalues,
    scatter_stats,
    x64_when_eager,
)

RANKME_EPS = 1e-7  # both RankMe papers add this to every probability
PAPER_ALPHA_WINDOW = (11, 100)  # 0-based [start, stop) of the Tracing paper (ranks 12..100)


def _entropy_of(p: jax.Array) -> jax.Array:
    """Shannon entropy ``-sum p ln p`` in nats, with ``0 ln 0 = 0``."""
    return -jnp.sum(jax.scipy.special.xlogy(p, p))


@jax.jit
def rankme_from_singular_values(s: jax.Array) -> jax.Array:
    """Garrido et al. 2023: ``p = s / sum(s) + 1e-7``, ``exp(-sum p ln p)`` (dimensionless)."""
    return jnp.exp(_entropy_of(s / jnp.sum(s) + RANKME_EPS))


@functools.partial(jax.jit, static_argnames="max_components")
def rankme_cov_from_eigenvalues(ev: jax.Array, max_components: int = 2048) -> jax.Array:
    """Li et al. 2025: ``q = ev / sum|ev| + 1e-7`` over the top ``max_components``, ``exp(H(q))``."""
    ev = ev[:max_components]
    return jnp.exp(_entropy_of(ev / jnp.sum(jnp.abs(ev)) + RANKME_EPS))


@jax.jit
def von_neumann_from_eigenvalues(ev: jax.Array) -> jax.Array:
    """``S = -sum l ln l`` with ``l = ev / sum(ev)`` (eigenvalues of M / tr M), nats."""
    return _entropy_of(ev / jnp.sum(ev))


@x64_when_eager
def rankme(x: Any, *, mesh: Mesh | None = None) -> jax.Array:
    """RankMe of Garrido et al. 2023 ("RankMe: assessing the downstream performance ...").

    ``s`` = singular values of the *uncentred* N x D ``x`` (``sqrt`` of the eigenvalues of
    ``X^T X``, min(N, D) of them); ``p = s / sum(s) + 1e-7``; ``RankMe = exp(-sum p ln p)``.
    Dimensionless, in about [1, min(N, D)]. float64 when called eagerly; sharded over ``mesh``.
    """
    return rankme_from_singular_values(jnp.sqrt(gram_eigenvalues(x, centred=False, mesh=mesh)))


@x64_when_eager
def rankme_cov(x: Any, max_components: int = 2048, *, mesh: Mesh | None = None) -> jax.Array:
    """RankMe as computed in Li et al. 2025 ("Tracing the representation geometry of LMs").

    ``ev`` = eigenvalues of the *centred* covariance (PCA explained variances, at most
    ``max_components`` largest kept), ``q = ev / sum|ev| + 1e-7``, ``exp(-sum q ln q)``.
    Dimensionless. Differs from :func:`rankme` (uncentred, singular values, not variances).
    """
    return rankme_cov_from_eigenvalues(gram_eigenvalues(x, centred=True, mesh=mesh), max_components)


@x64_when_eager
def covariance_spectrum(x: Any, centred: bool = True, *, mesh: Mesh | None = None) -> jax.Array:
    """Normalised spectrum ``l = ev / sum(ev)`` of the (centred) scatter, descending, min(N, D) values.

    ``ev`` are eigenvalues of ``Xc^T Xc`` (``centred=True``) or ``X^T X``; ``l`` sums to 1 and is the
    spectrum alpha-ReQ fits and von Neumann entropy integrates. Dimensionless; float64 eagerly.
    """
    ev = gram_eigenvalues(x, centred=centred, mesh=mesh)
    return ev / jnp.sum(ev)


@x64_when_eager
def von_neumann_entropy(x: Any, centred: bool = True, *, mesh: Mesh | None = None) -> jax.Array:
    """Von Neumann (matrix) entropy ``S = -sum l ln l``, ``l`` = eigenvalues of ``M / tr M``, nats.

    ``M = Xc^T Xc`` (centred covariance) or ``X^T X`` (``centred=False``); computed on the smaller
    side (N x N dual Gram when N < D, EntropyPrune's trick). ``exp(S)`` of the centred version is
    the Tracing RankMe without its 1e-7. Identity covariance gives ``ln D``. float64 eagerly.
    """
    return von_neumann_from_eigenvalues(gram_eigenvalues(x, centred=centred, mesh=mesh))


class AlphaReqResult(NamedTuple):
    """alpha-ReQ fit: slope ``alpha``, ``intercept`` and three R^2 values (see :func:`alpha_req`)."""

    alpha: jax.Array
    intercept: jax.Array
    r2: jax.Array
    r2_100: jax.Array
    r2_window: jax.Array


NULL_EIGENVALUE_RTOL = 1e-9


def default_alpha_window(num_eigenvalues: int) -> tuple[int, int]:
    """The paper window ``[11, 100)`` when it exists, else every rank ``[0, K)``.

    ``num_eigenvalues`` is the numerical rank K of the centred scatter (<= min(N - 1, D)). For K < 100
    the original code fails; we fit all ranks 1..K instead. SCIENCE.md (2026-11-28) found that
    over ranks 1..d alpha showed the compression phase at d = 32 while the top half (ranks
    1..16) did not, so the full range is the informative small-D choice.
    """
    if num_eigenvalues >= PAPER_ALPHA_WINDOW[1]:
        return PAPER_ALPHA_WINDOW
    return (0, num_eigenvalues)


def numerical_rank(ev: jax.Array, rtol: float = NULL_EIGENVALUE_RTOL) -> int:
    """Number of eigenvalues above ``rtol`` x the largest (``ev`` descending).

    A LayerNorm output has an exact null direction (its features sum to zero); float rounding
    turns it into an eigenvalue about 1e-13 of the largest. A power law fitted through that
    eigenvalue measures rounding, not geometry, so default windows stop at the numerical rank.
    """
    return int(jnp.sum(ev > rtol * ev[0]))


def _r2(y: jax.Array, y_hat: jax.Array, start: int, stop: int) -> jax.Array:
    """Coefficient of determination over ``[start, stop)``; NaN when fewer than two points."""
    if stop - start < 2:
        return jnp.asarray(jnp.nan, y.dtype)
    y, y_hat = y[start:stop], y_hat[start:stop]
    return 1.0 - jnp.sum((y - y_hat) ** 2) / jnp.sum((y - jnp.mean(y)) ** 2)


def _check_window(fit_range: tuple[int, int], k: int) -> None:
    start, stop = fit_range
    if not 0 <= start < stop <= k or stop - start < 2:
        raise ValueError(
            f"alpha fit window [{start}, {stop}) (0-based eigenvalue indices) does not fit a spectrum of "
            f"{k} eigenvalues: need 0 <= start, start + 2 <= stop <= {k}. Use a smaller window, or "
            "fit_range=None for the default (paper window [11, 100) when D >= 100, else [0, K))"
        )


def alpha_req_from_spectrum(ev: jax.Array, fit_range: tuple[int, int] | None = None) -> AlphaReqResult:
    """alpha-ReQ (Agrawal et al. 2022) from a descending spectrum; see :func:`alpha_req`."""
    k = ev.shape[0]
    if fit_range is None:
        fit_range = default_alpha_window(k if is_traced(ev) else numerical_rank(ev))
    start, stop = fit_range
    _check_window((start, stop), k)
    if not is_traced(ev) and not bool(jnp.all(ev[start:stop] > 0)):
        raise ValueError(
            f"eigenvalues in the fit window [{start}, {stop}) include zeros (numerical rank is lower); "
            "choose a window inside the numerical rank"
        )
    return _alpha_fit(ev, start, stop)


@functools.partial(jax.jit, static_argnames=("start", "stop"))
def _alpha_fit(ev: jax.Array, start: int, stop: int) -> AlphaReqResult:
    """Weighted least squares of ``ln ev_r`` on ``[-ln r, 1]``, weights ``1/r``, plus R^2 values."""
    k = ev.shape[0]
    log_ev = jnp.log(jnp.abs(ev))
    ranks = jnp.arange(1, k + 1, dtype=ev.dtype)
    design = jnp.stack([-jnp.log(ranks), jnp.ones_like(ranks)], axis=1)
    # The original computes the 1/r weights in float32; kept for value parity.
    w = (1.0 / jnp.arange(1, k + 1, dtype=jnp.float32)).astype(ev.dtype)[start:stop, None]
    a = design[start:stop]
    coef = jnp.linalg.solve(a.T @ (a * w), (a * w).T @ log_ev[start:stop])
    pred = design @ coef
    # The original evaluates R^2 from 0-based index start + 1 (its ranks array is shifted by one).
    r2 = _r2(log_ev, pred, start + 1, 500 if k >= 500 else k - 10)
    r2_100 = _r2(log_ev, pred, start + 1, min(100, k))
    return AlphaReqResult(coef[0], coef[1], r2, r2_100, _r2(log_ev, pred, start, stop))


@x64_when_eager
def alpha_req(
    x: Any, fit_range: tuple[int, int] | None = None, *, mesh: Mesh | None = None
) -> AlphaReqResult:
    """alpha-ReQ: power-law decay exponent of the centred covariance spectrum (Agrawal et al. 2022).

    ``ev_r`` (r = 1..K) = normalised centred-covariance eigenvalues, descending. Weighted least
    squares of ``ln ev_r`` on ``[-ln r, 1]`` with weights ``1/r`` over 0-based indices
    ``fit_range = [start, stop)``; ``alpha`` is the slope (dimensionless, ``ev_r ~ r^-alpha``).
    Default window: ``[11, 100)`` (Li et al. 2025) when K >= 100, else ``[0, K)`` (all ranks, see
    :func:`default_alpha_window`), K the numerical rank (:func:`numerical_rank`: eigenvalues
    above 1e-9 of the largest, which drops the null direction of LayerNorm outputs). R^2 on log
    values as in stringer_get_powerlaw (fastssl / Tracing code), M = min(N, D) eigenvalues:
    ``r2`` over indices ``[start+1, min(500, M-10))`` (500 when M >= 500), ``r2_100`` over
    ``[start+1, min(100, M))``; ``r2_window`` over the fit window itself. Raises ValueError for
    a window outside the spectrum (where the original code crashes).
    """
    check_matrix(x, values=False)
    return alpha_req_from_spectrum(gram_eigenvalues(x, centred=True, mesh=mesh), fit_range)


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
    ``alpha_req_r2_100`` and ``von_neumann_entropy`` (nats). Returns python floats (float64),
    the 0-based alpha window, and ``"spectrum"``: the normalised centred spectrum (numpy,
    descending). Memory O(N D + D^2). Eager only (returns host values).
    """
    check_matrix(x, values=False)
    n, d = np.shape(x)
    stats = scatter_stats(x, mesh)
    check_stats_finite(stats)
    ev_c, ev_u = paired_eigenvalues(stats, min(n, d))
    window = alpha_fit_range if alpha_fit_range is not None else default_alpha_window(numerical_rank(ev_c))
    fit = alpha_req_from_spectrum(ev_c, window)
    return {
        "rankme": float(rankme_from_singular_values(jnp.sqrt(ev_u))),
        "rankme_cov": float(rankme_cov_from_eigenvalues(ev_c, max_components)),
        "alpha_req": float(fit.alpha),
        "alpha_req_r2": float(fit.r2),
        "alpha_req_r2_100": float(fit.r2_100),
        "alpha_fit_start": int(window[0]),
        "alpha_fit_stop": int(window[1]),
        "von_neumann_entropy": float(von_neumann_from_eigenvalues(ev_c)),
        "von_neumann_entropy_uncentred": float(von_neumann_from_eigenvalues(ev_u)),
        "spectrum": np.asarray(ev_c / jnp.sum(ev_c)),
    }
