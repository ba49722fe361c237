"""Segment RankMe / alpha-ReQ trajectories into the training phases of Li et al. (2025).

The rule, as implemented here (docs/phases.md describes the phases themselves):

1. Per (run, stage, probe, layer), take RankMe (``rankme_cov``, the Tracing paper's variant, if present,
   else ``rankme``), ``alpha_req`` and the alpha fit's R^2 (``alpha_req_r2_window``, R^2 over the fit
   window itself, if the table has it, else ``alpha_req_r2``) at every checkpoint, ordered by step.
   Stages (pretrain, sft, ...) and runs are never mixed into one trajectory.
2. Estimate the checkpoint-to-checkpoint noise of each trajectory from the trajectory itself
   (:func:`checkpoint_noise`: robust spread of each checkpoint's departure from its neighbours, in log
   step; of log RankMe, so relative, and of alpha, in exponent units). A change between two
   checkpoints is *significant* when it exceeds both the relative ``threshold`` (default 10 %) and
   ``noise_multiple`` x sqrt(2) x the noise (:data:`NOISE_MULTIPLE`; sqrt(2) x the noise is the spread
   of a difference of two noisy checkpoints); for alpha, both ``alpha_min_change`` (absolute, default
   0.05: alpha can sit near 0 at initialisation, where a relative change means nothing) and its noise.
3. Find the turning points of the *raw* RankMe trajectory with a zig-zag detector: a running extremum
   becomes a turning point once RankMe has moved significantly away from it. No smoothing: checkpoints
   are log-spaced, so a warmup collapse can sit on one checkpoint only, and a running median would
   erase it; the noise gate is what keeps a single noisy checkpoint from counting. Consecutive turning
   points (plus the first and last checkpoints) bound the segments; every segment runs from one
   checkpoint to a later one (no zero-length segments), and all but possibly the last hold a
   significant RankMe move. Reported values and changes are the raw ones at the boundaries.
4. Label each segment from the raw RankMe and alpha at its two ends:
   - RankMe falls significantly and alpha rises significantly: **warmup** if the segment starts before
     ``warmup_steps``, else **compression-seeking**, but only if the alpha fit is adequate over the
     segment: the smallest R^2 at its checkpoints is >= ``min_alpha_r2`` (:data:`MIN_ALPHA_R2`). A
     poorer fit gives **unclassified (poor alpha fit)**: alpha then moves because the spectrum stopped
     being a power law (e.g. its smallest directions die), not because its decay steepened. Without
     R^2 rows the check cannot be made; the reason column says so.
   - RankMe rises significantly and alpha falls significantly: **entropy-seeking**;
   - anything else: **unclassified**. Such rows are kept, so the segments tile the whole trajectory.
   Every row carries ``reason``, the numbers behind its label, and ``alpha_r2``, the smallest alpha-fit
   R^2 over the segment's checkpoints (NaN without R^2 rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from entropy_jax.analysis.results import metric_trajectory, write_csv
from entropy_jax.workdir import Workdir

WARMUP = "warmup"
ENTROPY_SEEKING = "entropy-seeking"
COMPRESSION_SEEKING = "compression-seeking"
UNCLASSIFIED = "unclassified"
POOR_ALPHA_FIT = "unclassified (poor alpha fit)"
PHASE_COLUMNS: tuple[str, ...] = (
    "run", "stage", "probe", "layer", "phase", "start_step", "end_step", "start_tokens", "end_tokens",
    "rankme_start", "rankme_end", "alpha_start", "alpha_end", "relative_change", "alpha_r2", "reason",
)

MIN_ALPHA_R2 = 0.9
"""Smallest R^2 of the alpha-ReQ power-law fit (log eigenvalue on log rank) for compression-seeking.

Below 0.9 more than a tenth of the log-eigenvalue variance in the fit window is not a power law: the
spectrum bends (typically a cliff where its smallest directions die), and alpha then tracks the bend,
i.e. the window, rather than the decay. In the demo (width 32, fit over all ranks) alpha's late rise
came with R^2 falling to 0.42 while alpha over the top half of the spectrum fell. Very small widths fit
worse throughout (a width-16 test model: 0.69-0.89 over all ranks, initialisation included), so they
rarely get a compression label: there alpha is no evidence for one. Only compression-seeking is gated;
warmup and entropy-seeking rows still report their ``alpha_r2``."""

NOISE_MULTIPLE = 3.0
"""How many noise spreads a change between two checkpoints must exceed to count.

The difference of two checkpoints with independent noise of spread sigma has spread sqrt(2) sigma, so
the gate is ``3 sqrt(2) sigma``: about 0.3 % of pure-noise differences pass it, which leaves room for
the estimate of sigma from a dozen checkpoints (uncertain by about 40 %) and for the many pairs a
zig-zag compares. On the demo's 14 checkpoints (tests/test_phases.py, 1,000 seeded draws each): with
5 % noise and no signal, 0 trajectories get a warmup or compression label (226 without the gate); a
one-checkpoint 30 % collapse under 2 % noise is found in 995 (17 %: 865); 4 sigma would find only
about 94 % of the former."""

ALPHA_R2_METRICS: tuple[str, ...] = ("alpha_req_r2_window", "alpha_req_r2")
FIT_WINDOW_METRICS: tuple[str, str] = ("alpha_req_fit_start", "alpha_req_fit_stop")
MIN_POINTS_FOR_NOISE = 5
_MAD_TO_SD = 1.4826  # median absolute deviation -> standard deviation for a normal distribution


def checkpoint_noise(values: np.ndarray, steps: np.ndarray | None = None) -> float:
    """Spread (standard deviation) of the checkpoint-to-checkpoint noise of ``values``, from the values.

    Each interior checkpoint's residual from the straight line through its two neighbours, in log step
    (``log1p(steps)``; in index when ``steps`` is None), is scaled to the noise spread sigma (for
    independent noise a residual has spread ``sigma sqrt(1 + w_left^2 + w_right^2)``, the w the
    interpolation weights). A trend linear in log step leaves no residual, and the median absolute
    deviation of the residuals ignores the few that a sharp turning point makes large. 0.0 (no noise
    gate) with fewer than :data:`MIN_POINTS_FOR_NOISE` points, too few to estimate it.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < MIN_POINTS_FOR_NOISE:
        return 0.0
    u = np.arange(len(x), dtype=np.float64) if steps is None else np.log1p(np.asarray(steps, dtype=np.float64))
    w_right = (u[1:-1] - u[:-2]) / (u[2:] - u[:-2])  # weight of the right neighbour
    w_left = 1.0 - w_right
    residual = (x[1:-1] - w_left * x[:-2] - w_right * x[2:]) / np.sqrt(1.0 + w_left**2 + w_right**2)
    return float(_MAD_TO_SD * np.median(np.abs(residual - np.median(residual))))


def _significant(a: float, b: float, threshold: float, min_log_move: float) -> bool:
    """Whether positive ``a`` -> ``b`` moves by >= ``threshold`` relative and >= ``min_log_move`` in log."""
    return abs(b / a - 1.0) >= threshold and abs(np.log(b / a)) >= min_log_move


def zigzag_turning_points(values: np.ndarray, threshold: float = 0.1, min_log_move: float = 0.0) -> list[int]:
    """Indices of the first point, each confirmed turning point and the last point of ``values``.

    A running maximum (minimum) is confirmed as a turning point once a later value lies at least
    ``threshold`` below (above) it, relative to it, and at least ``min_log_move`` away in log. Values
    must be positive. The indices are strictly increasing.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return list(range(len(x)))
    if not np.all(np.isfinite(x) & (x > 0)):
        raise ValueError(f"turning points need positive finite values, got {x}")
    pivots, trend, extreme = [0], 0, 0
    for i in range(1, len(x)):
        if trend == 0:
            if _significant(x[0], x[i], threshold, min_log_move):
                trend = 1 if x[i] > x[0] else -1
                extreme = int(np.argmax(x[: i + 1]) if trend > 0 else np.argmin(x[: i + 1]))
        elif trend * (x[i] - x[extreme]) > 0:
            extreme = i
        elif _significant(x[extreme], x[i], threshold, min_log_move):
            pivots.append(extreme)
            trend, extreme = -trend, i
    if trend != 0 and extreme != pivots[-1]:
        pivots.append(extreme)
    if pivots[-1] != len(x) - 1:
        pivots.append(len(x) - 1)
    return pivots


def _r2_text(r2: float, r2_metric: str, step: int | None, window: tuple[int, int] | None) -> str:
    where = f" over ranks [{window[0]}, {window[1]})" if window is not None else ""
    return f"alpha fit R^2 ({r2_metric}{where}) min {r2:.2f} at step {step}"


def label_segment(
    rankme_change: float, alpha_change: float, start_step: int, *,
    threshold: float, alpha_min_change: float, warmup_steps: int,
    rankme_log_gate: float = 0.0, alpha_gate: float = 0.0, alpha_r2: float = float("nan"),
    min_alpha_r2: float = MIN_ALPHA_R2, r2_text: str = "",
) -> tuple[str, str]:
    """(phase, reason) of one segment from its relative RankMe change and absolute alpha change.

    ``rankme_log_gate`` / ``alpha_gate``: the noise gates (log RankMe, alpha units) each change must also
    exceed; ``alpha_r2``: the smallest alpha-fit R^2 over the segment (NaN: not recorded), checked
    against ``min_alpha_r2`` for compression-seeking only; ``r2_text`` describes it in the reason.
    """
    log_change = float(np.log1p(rankme_change))
    alpha_needed = max(alpha_min_change, alpha_gate)
    rankme_text = (f"RankMe {rankme_change:+.1%} (threshold {threshold:.0%}, noise gate "
                   f"{np.expm1(rankme_log_gate):.1%})")
    alpha_text = f"alpha {alpha_change:+.3f} (gate {alpha_needed:.3f})"
    rankme_moved = abs(rankme_change) >= threshold and abs(log_change) >= rankme_log_gate
    alpha_moved = abs(alpha_change) >= alpha_needed
    if not rankme_moved:
        return UNCLASSIFIED, f"{rankme_text}: RankMe change not significant; {alpha_text}"
    opposite = (rankme_change < 0) == (alpha_change > 0)
    if not (alpha_moved and opposite):
        why = "alpha moved the same way as RankMe" if alpha_moved else "alpha change not significant"
        return UNCLASSIFIED, f"{rankme_text}; {alpha_text}: {why}"
    if rankme_change > 0:
        return ENTROPY_SEEKING, f"{rankme_text} rises and {alpha_text} falls"
    if start_step < warmup_steps:
        return WARMUP, f"{rankme_text} falls and {alpha_text} rises, from step {start_step} < warmup {warmup_steps}"
    base = f"{rankme_text} falls and {alpha_text} rises, after warmup ({warmup_steps} steps)"
    if np.isnan(alpha_r2):
        return COMPRESSION_SEEKING, f"{base}; alpha fit R^2 not recorded, fit quality unchecked"
    if alpha_r2 < min_alpha_r2:
        return POOR_ALPHA_FIT, (f"{base}, but {r2_text} < {min_alpha_r2:.2f}: alpha's rise does not "
                                "measure a steeper power-law decay")
    return COMPRESSION_SEEKING, f"{base}; {r2_text} >= {min_alpha_r2:.2f}"


def segment_trajectory(
    steps: np.ndarray, tokens: np.ndarray, rankme: np.ndarray, alpha: np.ndarray, *,
    alpha_r2: np.ndarray | None = None, r2_metric: str = ALPHA_R2_METRICS[0],
    fit_start: np.ndarray | None = None, fit_stop: np.ndarray | None = None,
    threshold: float = 0.1, alpha_min_change: float = 0.05, warmup_steps: int = 0,
    noise_multiple: float = NOISE_MULTIPLE, min_alpha_r2: float = MIN_ALPHA_R2,
) -> pd.DataFrame:
    """Phases of one trajectory (see the module docstring for the rule).

    Boundaries are checkpoints; the RankMe / alpha values reported and ``relative_change`` (RankMe end /
    start - 1) are the raw values at the boundaries. ``alpha_r2`` (per checkpoint, NaN where missing)
    gates compression-seeking; ``r2_metric`` names it in the reason, with the fit window ``[fit_start,
    fit_stop)`` (0-based ranks, per checkpoint) when given. Steps must be distinct.
    """
    order = np.argsort(steps, kind="stable")
    steps, tokens = np.asarray(steps)[order], np.asarray(tokens)[order]
    if len(np.unique(steps)) != len(steps):
        raise ValueError(f"a trajectory needs distinct checkpoint steps, got {steps}")
    rankme = np.asarray(rankme, dtype=np.float64)[order]
    alpha = np.asarray(alpha, dtype=np.float64)[order]
    r2 = np.full(len(steps), np.nan) if alpha_r2 is None else np.asarray(alpha_r2, dtype=np.float64)[order]
    window = None
    if fit_start is not None and fit_stop is not None:
        window = (np.asarray(fit_start, dtype=np.float64)[order], np.asarray(fit_stop, dtype=np.float64)[order])
    sqrt2 = np.sqrt(2.0)
    rankme_noise, alpha_noise = checkpoint_noise(np.log(rankme), steps), checkpoint_noise(alpha, steps)
    rankme_log_gate = noise_multiple * sqrt2 * rankme_noise
    alpha_gate = noise_multiple * sqrt2 * alpha_noise
    pivots = zigzag_turning_points(rankme, threshold, rankme_log_gate)
    rows = []
    for start, end in zip(pivots[:-1], pivots[1:], strict=True):
        change = float(rankme[end] / rankme[start] - 1.0)
        seg_r2, r2_text = float("nan"), ""
        span = r2[start: end + 1]
        if np.isfinite(span).any():
            worst = start + int(np.nanargmin(span))
            seg_r2 = float(r2[worst])
            fit = None
            if window is not None and np.isfinite(window[0][worst]) and np.isfinite(window[1][worst]):
                fit = (int(window[0][worst]), int(window[1][worst]))
            r2_text = _r2_text(seg_r2, r2_metric, int(steps[worst]), fit)
        phase, reason = label_segment(
            change, float(alpha[end] - alpha[start]), int(steps[start]),
            threshold=threshold, alpha_min_change=alpha_min_change, warmup_steps=warmup_steps,
            rankme_log_gate=rankme_log_gate, alpha_gate=alpha_gate, alpha_r2=seg_r2,
            min_alpha_r2=min_alpha_r2, r2_text=r2_text,
        )
        rows.append(dict(
            phase=phase, start_step=int(steps[start]), end_step=int(steps[end]),
            start_tokens=int(tokens[start]), end_tokens=int(tokens[end]),
            rankme_start=float(rankme[start]), rankme_end=float(rankme[end]),
            alpha_start=float(alpha[start]), alpha_end=float(alpha[end]), relative_change=change,
            alpha_r2=seg_r2, reason=reason,
        ))
    return pd.DataFrame(rows, columns=list(PHASE_COLUMNS[4:]))


def infer_warmup_steps(train_metrics: pd.DataFrame | None, stage: str | None = None) -> int:
    """The logged step at which the learning rate first peaks (0 without an ``lr`` column or a rise).

    With ``stage`` and a ``stage`` column in the log, only that stage's rows count.
    """
    if train_metrics is None or "lr" not in train_metrics.columns:
        return 0
    train_metrics = train_metrics.dropna(subset=["lr"])  # a stage's step-0 row holds only its evaluation
    if stage is not None and "stage" in train_metrics.columns:
        train_metrics = train_metrics[train_metrics["stage"].astype(str) == stage]
    if train_metrics.empty:
        return 0
    lr = train_metrics["lr"].to_numpy(dtype=np.float64)
    peak = int(np.argmax(lr))
    return int(train_metrics["step"].iloc[peak]) if lr[peak] > lr[0] else 0


def pick_rankme_metric(results: pd.DataFrame) -> str:
    """``rankme_cov`` (Li et al. 2025, the phases paper) if the table has it, else ``rankme``."""
    present = set(results["metric"].unique())
    for name in ("rankme_cov", "rankme"):
        if name in present:
            return name
    raise ValueError(f"results table has no RankMe rows; metrics present: {sorted(present)}")


def pick_alpha_r2_metric(results: pd.DataFrame) -> str | None:
    """``alpha_req_r2_window`` (R^2 over the fit window) if the table has it, else ``alpha_req_r2``, else None."""
    present = set(results["metric"].unique())
    return next((name for name in ALPHA_R2_METRICS if name in present), None)


def detect_phases(
    results: pd.DataFrame, *, train_metrics: pd.DataFrame | None = None, probe: str | None = None,
    layer: int | None = None, threshold: float = 0.1, alpha_min_change: float = 0.05,
    warmup_steps: int | None = None, rankme_metric: str | None = None,
    noise_multiple: float = NOISE_MULTIPLE, min_alpha_r2: float = MIN_ALPHA_R2,
) -> pd.DataFrame:
    """Phase table (columns :data:`PHASE_COLUMNS`) for every (run, stage, probe, layer) with RankMe and alpha.

    Args:
      results: the tidy results table (:func:`entropy_jax.analysis.results.load_results`).
      train_metrics: the training log; used only to infer ``warmup_steps`` when that is None (per stage
        when the log has a ``stage`` column).
      probe, layer: restrict to one probe / one layer (None = all).
      threshold: minimum relative change of RankMe for a phase (default 0.1 = 10 %).
      alpha_min_change: minimum opposite change of alpha-ReQ, absolute (default 0.05).
      warmup_steps: LR warmup length in steps; None infers it from ``lr`` in ``train_metrics`` (or 0).
      rankme_metric: ``rankme_cov`` or ``rankme``; None picks ``rankme_cov`` when present.
      noise_multiple: changes must also exceed this many noise spreads (:data:`NOISE_MULTIPLE`).
      min_alpha_r2: smallest alpha-fit R^2 for compression-seeking (:data:`MIN_ALPHA_R2`).
    """
    rankme_metric = rankme_metric or pick_rankme_metric(results)
    r2_metric = pick_alpha_r2_metric(results)
    extra = [m for m in (r2_metric, *FIT_WINDOW_METRICS) if m is not None]
    rows = results[(results["head"] == -1) & results["metric"].isin([rankme_metric, "alpha_req", *extra])]
    if probe is not None:
        rows = rows[rows["probe"] == probe]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    tables = []
    for (run, stage, probe_name, layer_index), group in rows.groupby(["run", "stage", "probe", "layer"]):
        rankme = metric_trajectory(group, rankme_metric, probe=probe_name, layer=layer_index)
        alpha = metric_trajectory(group, "alpha_req", probe=probe_name, layer=layer_index)
        both = rankme.merge(alpha[["step", "value"]], on="step", suffixes=("_rankme", "_alpha")).dropna()
        if len(both) < 2:
            continue
        optional = {}
        for name in extra:
            values = metric_trajectory(group, name, probe=probe_name, layer=layer_index)
            optional[name] = both[["step"]].merge(values[["step", "value"]], on="step", how="left")["value"]
        stage_warmup = infer_warmup_steps(train_metrics, str(stage)) if warmup_steps is None else warmup_steps
        table = segment_trajectory(
            both["step"].to_numpy(), both["tokens_seen"].to_numpy(), both["value_rankme"].to_numpy(),
            both["value_alpha"].to_numpy(),
            alpha_r2=optional[r2_metric].to_numpy() if r2_metric in optional else None,
            r2_metric=r2_metric or ALPHA_R2_METRICS[0],
            fit_start=optional[FIT_WINDOW_METRICS[0]].to_numpy() if FIT_WINDOW_METRICS[0] in optional else None,
            fit_stop=optional[FIT_WINDOW_METRICS[1]].to_numpy() if FIT_WINDOW_METRICS[1] in optional else None,
            threshold=threshold, alpha_min_change=alpha_min_change, warmup_steps=stage_warmup,
            noise_multiple=noise_multiple, min_alpha_r2=min_alpha_r2,
        )
        tables.append(table.assign(run=run, stage=stage, probe=probe_name, layer=int(layer_index)))
    if not tables:
        return pd.DataFrame(columns=list(PHASE_COLUMNS))
    return pd.concat(tables, ignore_index=True)[list(PHASE_COLUMNS)]


def write_phases(phases: pd.DataFrame, workdir: str | Path) -> Path:
    """Write the phase table beside the results, to ``workdir/probes/phases.csv``; return the path."""
    return write_csv(phases, Workdir(workdir).phases)


def format_phases(phases: pd.DataFrame) -> str:
    """Human-readable text of the phase table, one block per (run, stage, probe, layer), reasons below."""
    if phases.empty:
        return "no phases: the table has no trajectory with both RankMe and alpha-ReQ"
    blocks = []
    shown = ["phase", "start_step", "end_step", "start_tokens", "end_tokens",
             "rankme_start", "rankme_end", "alpha_start", "alpha_end", "relative_change"]
    shown += [c for c in ("alpha_r2",) if c in phases.columns]
    for (run, stage, probe, layer), group in phases.groupby(["run", "stage", "probe", "layer"], sort=False):
        body = group[shown].to_string(
            index=False, float_format=lambda v: f"{v:.3g}",
            formatters={"relative_change": lambda v: f"{v:+.1%}"},
        )
        if "reason" in group.columns:
            body += "".join(f"\n  {row.start_step}-{row.end_step} {row.phase}: {row.reason}"
                            for row in group.itertuples())
        blocks.append(f"{run} / {stage} / {probe} / layer {layer}\n{body}")
    return "\n\n".join(blocks)
