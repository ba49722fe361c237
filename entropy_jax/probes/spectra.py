"""Representation spectra of N x D activations: RankMe (two variants), alpha-ReQ, von Neumann entropy.

All functions reduce X to its D x D scatter in one (optionally sharded) pass, see
:mod:`entropy_jax.probes.stats`, then take eigenvalues. Eagerly they compute in float64 whatever
the input dtype (a float32 input gives the float64 answer for its float32 values); traced under a
caller's ``jit`` they use that trace's float dtype, and give the eager value to that dtype's
rounding. Rank <= 1 data (collapse) give each metric's limit, never an error: see
:func:`spectral_metrics`.
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
MIN_ALPHA_EIGENVALUES = 3  # a power law through two points always fits: no alpha below three
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


def _normalised(ev: jax.Array, total: jax.Array) -> jax.Array:
    """``ev / total``; a zero spectrum becomes the one-point distribution ``e_1`` (see :func:`rankme`)."""
    one_point = jnp.zeros_like(ev).at[0].set(1.0)
    return jnp.where(total > 0, ev / jnp.where(total > 0, total, 1.0), one_point)


def _entropy_of(p: jax.Array) -> jax.Array:
    """Shannon entropy ``-sum p ln p`` in nats, with ``0 ln 0 = 0``."""
    return -jnp.sum(jax.scipy.special.xlogy(p, p))


def _rank_count(ev: jax.Array) -> jax.Array:
    """Traceable :func:`numerical_rank`: eigenvalues above ``null_eigenvalue_rtol`` x the largest."""
    return jnp.sum(ev > null_eigenvalue_rtol(ev.dtype) * ev[0])


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


class AlphaReqResult(NamedTuple):
    """alpha-ReQ fit: slope ``alpha``, ``intercept`` and three R^2 values (see :func:`alpha_req`)."""

    alpha: jax.Array
    intercept: jax.Array
    r2: jax.Array
    r2_100: jax.Array
    r2_window: jax.Array


def default_alpha_window(num_eigenvalues: int) -> tuple[int, int]:
    """The paper window ``[11, 100)`` when it exists, else every rank ``[0, K)``.

    ``num_eigenvalues`` is the numerical rank K of the centred scatter (<= min(N - 1, D)). For K < 100
    the original code fails; we fit all ranks 1..K instead. A feasibility study (tiny GPTs, d = 32)
    found that over ranks 1..d alpha showed the compression phase while over the top half
    (ranks 1..16) it did not, so the full range is the informative small-D choice. For K < 3
    (:data:`MIN_ALPHA_EIGENVALUES`) there is no fit: the default alpha is NaN.
    """
    if num_eigenvalues >= PAPER_ALPHA_WINDOW[1]:
        return PAPER_ALPHA_WINDOW
    return (0, num_eigenvalues)


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


def _r2(y: jax.Array, y_hat: jax.Array, mask: jax.Array) -> jax.Array:
    """Coefficient of determination over the entries where ``mask``; NaN when fewer than two."""
    n = jnp.sum(mask)
    mean = jnp.sum(jnp.where(mask, y, 0.0)) / jnp.maximum(n, 1)
    ss_res = jnp.sum(jnp.where(mask, (y - y_hat) ** 2, 0.0))
    ss_tot = jnp.sum(jnp.where(mask, (y - mean) ** 2, 0.0))
    return jnp.where(n >= 2, 1.0 - ss_res / ss_tot, jnp.nan)


def r2_stop(num_eigenvalues: int) -> int:
    """End (exclusive, 0-based) of the R^2 range of the original code: 500 when M >= 512, else M - 10."""
    return 500 if num_eigenvalues >= 512 else num_eigenvalues - 10


def _check_window(fit_range: tuple[int, int], k: int) -> None:
    start, stop = fit_range
    if not 0 <= start < stop <= k or stop - start < 2:
        raise ValueError(
            f"alpha fit window [{start}, {stop}) (0-based eigenvalue indices) does not fit a spectrum of "
            f"{k} eigenvalues: need 0 <= start, start + 2 <= stop <= {k}. Use a smaller window, or "
            "fit_range=None for the default (paper window [11, 100) when D >= 100, else [0, K))"
        )


@jax.jit
def _alpha_fit(ev: jax.Array, start: Any, stop: Any) -> AlphaReqResult:
    """Weighted least squares of ``ln ev_r`` on ``[-ln r, 1]``, weights ``1/r``, plus R^2 values.

    ``start``/``stop`` may be traced: the fit runs over all K ranks with zero weight outside
    ``[start, stop)``, so a data-dependent window keeps static shapes.
    """
    k = ev.shape[0]
    idx = jnp.arange(k)
    log_ev = jnp.log(jnp.abs(ev))
    ranks = jnp.arange(1, k + 1, dtype=ev.dtype)
    design = jnp.stack([-jnp.log(ranks), jnp.ones_like(ranks)], axis=1)
    in_fit = (idx >= start) & (idx < stop)
    # The original computes the 1/r weights in float32; kept for value parity.
    w = jnp.where(in_fit, (1.0 / jnp.arange(1, k + 1, dtype=jnp.float32)).astype(ev.dtype), 0.0)
    aw = design * w[:, None]
    coef = jnp.linalg.solve(design.T @ aw, aw.T @ jnp.where(in_fit, log_ev, 0.0))
    pred = design @ coef
    # The original evaluates R^2 from 0-based index start + 1 (its ranks array is shifted by one).
    # Both ranges stop at the numerical rank: past it, ln ev is rounding (or -inf), not geometry.
    below_rank = idx < _rank_count(ev)
    r2 = _r2(log_ev, pred, (idx >= start + 1) & (idx < r2_stop(k)) & below_rank)
    r2_100 = _r2(log_ev, pred, (idx >= start + 1) & (idx < min(100, k)) & below_rank)
    return AlphaReqResult(coef[0], coef[1], r2, r2_100, _r2(log_ev, pred, in_fit))


@jax.jit
def _default_alpha_fit(ev: jax.Array) -> AlphaReqResult:
    """:func:`_alpha_fit` over :func:`default_alpha_window` of the numerical rank, counted in the trace."""
    rank = _rank_count(ev)
    paper = rank >= PAPER_ALPHA_WINDOW[1]
    start = jnp.where(paper, PAPER_ALPHA_WINDOW[0], 0)
    stop = jnp.where(paper, PAPER_ALPHA_WINDOW[1], rank)
    fit = _alpha_fit(ev, start, stop)
    return AlphaReqResult(*(jnp.where(rank >= MIN_ALPHA_EIGENVALUES, v, jnp.nan) for v in fit))


@x64_when_eager
def alpha_req_from_spectrum(ev: jax.Array, fit_range: tuple[int, int] | None = None) -> AlphaReqResult:
    """alpha-ReQ (Agrawal et al. 2022) from a descending spectrum; see :func:`alpha_req`.

    The default window is found from the numerical rank inside the computation (eager and traced
    alike), so ``jit`` gives the eager value; all NaN below three usable eigenvalues. float64
    when called eagerly, like :func:`alpha_req`.
    """
    if fit_range is None:
        return _default_alpha_fit(ev)
    start, stop = fit_range
    _check_window((start, stop), ev.shape[0])
    if not is_traced(ev) and not bool(jnp.all(ev[start:stop] > 0)):
        raise ValueError(
            f"eigenvalues in the fit window [{start}, {stop}) include zeros (numerical rank is lower); "
            "choose a window inside the numerical rank"
        )
    return _alpha_fit(ev, start, stop)


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
    above 1e-9 of the largest in float64, 100 eps in float32, which drops the null direction of
    LayerNorm outputs); K is counted inside the computation, so a caller's ``jit`` gets the same
    window. With the default window and K < 3 (collapsed data: rank <= 2) every field is NaN:
    no power law can be told apart. R^2 on log values as in stringer_get_powerlaw (fastssl /
    Tracing code), M = min(N, D) eigenvalues: ``r2`` over indices ``[start+1, 500)`` when
    M >= 512, else ``[start+1, M-10)``; ``r2_100`` over ``[start+1, min(100, M))``; both cut at
    the numerical rank K (the original runs on into rounding-level eigenvalues, e.g. the LayerNorm
    null direction when M < 100, and its R^2 then measures rounding); ``r2_window`` over the fit
    window itself; each NaN with fewer than two points. Raises
    ValueError for an explicit window outside the spectrum (where the original code crashes)
    or, eagerly, one that holds zero eigenvalues.
    """
    check_matrix(x, values=False)
    return alpha_req_from_spectrum(gram_eigenvalues(x, centred=True, mesh=mesh), fit_range)


def _nan_fit(dtype: Any) -> AlphaReqResult:
    return AlphaReqResult(*(jnp.asarray(jnp.nan, dtype) for _ in AlphaReqResult._fields))


def _limit_notes(metric: str, rank: int, what: str, limit: str) -> dict[str, str]:
    """Note for a RankMe / entropy at its rank <= 1 limit (``what`` names the spectrum)."""
    if rank == 0:
        return {metric: f"zero {what} (no direction of variance): one-point limit {limit}"}
    if rank == 1:
        return {metric: f"rank-1 {what}: lower limit {limit}"}
    return {}


def _alpha_notes(
    ev: np.ndarray, rank: int, window: tuple[int, int], explicit: bool, fit: AlphaReqResult
) -> dict[str, str]:
    """Why alpha-ReQ or one of its R^2 values is NaN, one line each."""
    start, stop = window
    notes = {}
    if not explicit and rank < MIN_ALPHA_EIGENVALUES:
        reason = (
            f"fewer than {MIN_ALPHA_EIGENVALUES} eigenvalues above the numerical-rank threshold "
            f"(rank {rank}): no power law to fit"
        )
        return {k: reason for k in ("alpha_req", "alpha_req_r2", "alpha_req_r2_100", "alpha_req_r2_window")}
    if explicit and stop > rank:
        reason = (
            f"fit window [{start}, {stop}) extends past the numerical rank {rank}: "
            "eigenvalues there are zero or rounding, a fit would measure rounding"
        )
        return {k: reason for k in ("alpha_req", "alpha_req_r2", "alpha_req_r2_100", "alpha_req_r2_window")}
    m = len(ev)
    for key, value, lo, hi in (
        ("alpha_req_r2", fit.r2, start + 1, min(r2_stop(m), rank)),
        ("alpha_req_r2_100", fit.r2_100, start + 1, min(100, m, rank)),
        ("alpha_req_r2_window", fit.r2_window, start, stop),
    ):
        if np.isfinite(float(value)):
            continue
        if hi - lo < 2:
            notes[key] = (
                f"R^2 range [{lo}, {hi}) holds fewer than 2 eigenvalues (M = {m}, numerical rank {rank})"
            )
        else:
            notes[key] = f"R^2 over [{lo}, {hi}) is undefined (log eigenvalues constant there)"
    return notes


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
        _check_window(window, len(ev_c))
        fit = _nan_fit(ev_c.dtype) if window[1] > rank_c else alpha_req_from_spectrum(ev_c, window)
    else:
        window = default_alpha_window(rank_c)
        fit = alpha_req_from_spectrum(ev_c)
    notes = {
        **_limit_notes("rankme", rank_u, "data (uncentred spectrum)", "RankMe ~1"),
        **_limit_notes("rankme_cov", rank_c, "centred covariance", "RankMe ~1"),
        **_limit_notes("von_neumann_entropy", rank_c, "centred covariance", "entropy 0"),
        **_limit_notes("von_neumann_entropy_uncentred", rank_u, "data (uncentred spectrum)", "entropy 0"),
        **_alpha_notes(np.asarray(ev_c), rank_c, window, explicit, fit),
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
