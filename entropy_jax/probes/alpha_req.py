"""alpha-ReQ (Agrawal et al. 2022): power-law decay exponent of the centred covariance spectrum.

The weighted least-squares fit of ``ln ev_r`` on ``-ln r``, its default window (the Tracing
paper's ranks 12..100, or every rank below the numerical rank), the R^2 values of the original
code, and the one-line reasons :func:`~entropy_jax.probes.spectra.spectral_metrics` gives when
alpha or an R^2 is NaN. The spectrum comes from :mod:`entropy_jax.probes.stats` (one scatter
pass); float64 eagerly, the trace's float dtype under a caller's ``jit``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from entropy_jax.probes.stats import check_matrix, gram_eigenvalues, is_traced, rank_count, x64_when_eager

PAPER_ALPHA_WINDOW = (11, 100)  # 0-based [start, stop) of the Tracing paper (ranks 12..100)
MIN_ALPHA_EIGENVALUES = 3  # a power law through two points always fits: no alpha below three


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


def check_window(fit_range: tuple[int, int], k: int) -> None:
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
    below_rank = idx < rank_count(ev)
    r2 = _r2(log_ev, pred, (idx >= start + 1) & (idx < r2_stop(k)) & below_rank)
    r2_100 = _r2(log_ev, pred, (idx >= start + 1) & (idx < min(100, k)) & below_rank)
    return AlphaReqResult(coef[0], coef[1], r2, r2_100, _r2(log_ev, pred, in_fit))


@jax.jit
def _default_alpha_fit(ev: jax.Array) -> AlphaReqResult:
    """:func:`_alpha_fit` over :func:`default_alpha_window` of the numerical rank, counted in the trace."""
    rank = rank_count(ev)
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
    check_window((start, stop), ev.shape[0])
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
    :func:`default_alpha_window`), K the numerical rank (:func:`~entropy_jax.probes.stats.numerical_rank`: eigenvalues
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


def nan_fit(dtype: Any) -> AlphaReqResult:
    return AlphaReqResult(*(jnp.asarray(jnp.nan, dtype) for _ in AlphaReqResult._fields))


def alpha_notes(
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
