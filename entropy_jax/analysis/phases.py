"""Segment RankMe / alpha-ReQ trajectories into the training phases of Li et al. (2025).

The rule (METRICS.md, "Training-phase vocabulary"), as implemented here:

1. Per (run, stage, probe, layer), take RankMe (``rankme_cov``, the Tracing paper's variant, if present,
   else ``rankme``) and ``alpha_req`` at every checkpoint, ordered by step.
2. Smooth both with a running median over ``smoothing_window`` consecutive checkpoints (default 3;
   edges repeat the end values). Checkpoints are log-spaced, so neighbours are log-step neighbours;
   a median removes single-checkpoint spikes without shifting turning points.
3. Find the turning points of smoothed RankMe with a zig-zag detector: a running extremum becomes a
   turning point once RankMe has moved away from it by at least ``threshold`` (default 10 %) relative
   to it. Consecutive turning points (plus the first and last checkpoints) bound the segments, so
   every segment but the last holds a sustained relative change of at least ``threshold``. Each turning
   point is then moved to the raw extremum within ``smoothing_window // 2`` checkpoints of it (the median
   flattens a sharp minimum over its neighbours, so the smoothed series alone can be one checkpoint off).
4. Label each segment from its smoothed start/end values:
   - RankMe falls by >= ``threshold`` and alpha rises by >= ``alpha_min_change``: **warmup** if the
     segment starts before ``warmup_steps``, else **compression-seeking**;
   - RankMe rises by >= ``threshold`` and alpha falls by >= ``alpha_min_change``: **entropy-seeking**;
   - anything else (a smaller move, or alpha not moving the opposite way): **unclassified**. Such rows
     are kept, not dropped, so the segments tile the whole trajectory.
   alpha's change is absolute (exponent units, default 0.05): alpha can sit near 0 at initialisation,
   where a relative change means nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import median_filter

from entropy_jax.analysis.results import metric_trajectory

WARMUP = "warmup"
ENTROPY_SEEKING = "entropy-seeking"
COMPRESSION_SEEKING = "compression-seeking"
UNCLASSIFIED = "unclassified"
PHASE_COLUMNS: tuple[str, ...] = (
    "run", "stage", "probe", "layer", "phase", "start_step", "end_step", "start_tokens", "end_tokens",
    "rankme_start", "rankme_end", "alpha_start", "alpha_end", "relative_change",
)


def smooth_over_checkpoints(values: np.ndarray, window: int = 3) -> np.ndarray:
    """Running median over ``window`` consecutive checkpoints (odd; 1 = no smoothing; edges repeat)."""
    values = np.asarray(values, dtype=np.float64)
    if window % 2 == 0 or window < 1:
        raise ValueError(f"smoothing window must be a positive odd number, got {window}")
    window = min(window, len(values) - (1 - len(values) % 2))
    if window <= 1:
        return values.copy()
    return median_filter(values, size=window, mode="nearest")


def zigzag_turning_points(values: np.ndarray, threshold: float = 0.1) -> list[int]:
    """Indices of the first point, each confirmed turning point and the last point of ``values``.

    A running maximum (minimum) is confirmed as a turning point once a later value lies at least
    ``threshold`` below (above) it, relative to it. Values must be positive.
    """
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return list(range(len(x)))
    pivots, trend, extreme = [0], 0, 0
    for i in range(1, len(x)):
        if trend == 0:
            if abs(x[i] / x[0] - 1.0) >= threshold:
                trend = 1 if x[i] > x[0] else -1
                extreme = int(np.argmax(x[: i + 1]) if trend > 0 else np.argmin(x[: i + 1]))
        elif trend * (x[i] - x[extreme]) > 0:
            extreme = i
        elif abs(x[i] / x[extreme] - 1.0) >= threshold:
            pivots.append(extreme)
            trend, extreme = -trend, i
    if trend != 0 and extreme != pivots[-1]:
        pivots.append(extreme)
    if pivots[-1] != len(x) - 1:
        pivots.append(len(x) - 1)
    return pivots


def refine_turning_points(raw: np.ndarray, smoothed: np.ndarray, pivots: list[int], window: int) -> list[int]:
    """Move each interior turning point to the raw extremum within ``window // 2`` checkpoints.

    A running median flattens a sharp extremum over neighbouring checkpoints, so the smoothed series
    can tie there; the raw series says which of them is the real turning point.
    """
    refined, half = list(pivots), window // 2
    for k in range(1, len(pivots) - 1):
        lo, hi = max(refined[k - 1] + 1, pivots[k] - half), min(pivots[k + 1] - 1, pivots[k] + half)
        neighbourhood = raw[lo: hi + 1]
        is_peak = smoothed[pivots[k]] > smoothed[pivots[k - 1]]
        refined[k] = lo + int(np.argmax(neighbourhood) if is_peak else np.argmin(neighbourhood))
    return refined


def label_segment(
    rankme_change: float, alpha_change: float, start_step: int, *,
    threshold: float, alpha_min_change: float, warmup_steps: int,
) -> str:
    """Phase name of one segment from its relative RankMe change and absolute alpha change."""
    if rankme_change <= -threshold and alpha_change >= alpha_min_change:
        return WARMUP if start_step < warmup_steps else COMPRESSION_SEEKING
    if rankme_change >= threshold and alpha_change <= -alpha_min_change:
        return ENTROPY_SEEKING
    return UNCLASSIFIED


def segment_trajectory(
    steps: np.ndarray, tokens: np.ndarray, rankme: np.ndarray, alpha: np.ndarray, *,
    threshold: float = 0.1, smoothing_window: int = 3, alpha_min_change: float = 0.05,
    warmup_steps: int = 0,
) -> pd.DataFrame:
    """Phases of one trajectory (see the module docstring for the rule).

    Boundaries are checkpoints; the RankMe / alpha values reported and ``relative_change`` (RankMe end /
    start - 1) are the smoothed ones, so a segment's change can differ slightly from the raw values'.
    """
    order = np.argsort(steps, kind="stable")
    steps, tokens = np.asarray(steps)[order], np.asarray(tokens)[order]
    rankme = np.asarray(rankme, dtype=np.float64)[order]
    rankme_s = smooth_over_checkpoints(rankme, smoothing_window)
    alpha_s = smooth_over_checkpoints(np.asarray(alpha)[order], smoothing_window)
    pivots = zigzag_turning_points(rankme_s, threshold)
    pivots = refine_turning_points(rankme, rankme_s, pivots, smoothing_window)
    rows = []
    for start, end in zip(pivots[:-1], pivots[1:], strict=True):
        change = float(rankme_s[end] / rankme_s[start] - 1.0)
        phase = label_segment(
            change, float(alpha_s[end] - alpha_s[start]), int(steps[start]),
            threshold=threshold, alpha_min_change=alpha_min_change, warmup_steps=warmup_steps,
        )
        rows.append(dict(
            phase=phase, start_step=int(steps[start]), end_step=int(steps[end]),
            start_tokens=int(tokens[start]), end_tokens=int(tokens[end]),
            rankme_start=float(rankme_s[start]), rankme_end=float(rankme_s[end]),
            alpha_start=float(alpha_s[start]), alpha_end=float(alpha_s[end]), relative_change=change,
        ))
    return pd.DataFrame(rows, columns=list(PHASE_COLUMNS[4:]))


def infer_warmup_steps(train_metrics: pd.DataFrame | None) -> int:
    """The logged step at which the learning rate first peaks (0 without an ``lr`` column or a rise)."""
    if train_metrics is None or "lr" not in train_metrics.columns or train_metrics.empty:
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


def detect_phases(
    results: pd.DataFrame, *, train_metrics: pd.DataFrame | None = None, probe: str | None = None,
    layer: int | None = None, threshold: float = 0.1, smoothing_window: int = 3,
    alpha_min_change: float = 0.05, warmup_steps: int | None = None, rankme_metric: str | None = None,
) -> pd.DataFrame:
    """Phase table (columns :data:`PHASE_COLUMNS`) for every (run, stage, probe, layer) with RankMe and alpha.

    Args:
      results: the tidy results table (:func:`entropy_jax.analysis.results.load_results`).
      train_metrics: the training log; used only to infer ``warmup_steps`` when that is None.
      probe, layer: restrict to one probe / one layer (None = all).
      threshold: minimum sustained relative change of RankMe for a phase (default 0.1 = 10 %).
      smoothing_window: running-median window in checkpoints (odd; default 3).
      alpha_min_change: minimum opposite change of alpha-ReQ, absolute (default 0.05).
      warmup_steps: LR warmup length in steps; None infers it from ``lr`` in ``train_metrics`` (or 0).
      rankme_metric: ``rankme_cov`` or ``rankme``; None picks ``rankme_cov`` when present.
    """
    rankme_metric = rankme_metric or pick_rankme_metric(results)
    if warmup_steps is None:
        warmup_steps = infer_warmup_steps(train_metrics)
    rows = results[(results["head"] == -1) & results["metric"].isin([rankme_metric, "alpha_req"])]
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
        table = segment_trajectory(
            both["step"].to_numpy(), both["tokens_seen"].to_numpy(), both["value_rankme"].to_numpy(),
            both["value_alpha"].to_numpy(), threshold=threshold, smoothing_window=smoothing_window,
            alpha_min_change=alpha_min_change, warmup_steps=warmup_steps,
        )
        tables.append(table.assign(run=run, stage=stage, probe=probe_name, layer=int(layer_index)))
    if not tables:
        return pd.DataFrame(columns=list(PHASE_COLUMNS))
    return pd.concat(tables, ignore_index=True)[list(PHASE_COLUMNS)]


def write_phases(phases: pd.DataFrame, workdir: str | Path) -> Path:
    """Write the phase table beside the results, to ``workdir/probes/phases.csv``; return the path."""
    path = Path(workdir) / "probes" / "phases.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    phases.to_csv(path, index=False)
    return path


def format_phases(phases: pd.DataFrame) -> str:
    """Human-readable text of the phase table, one block per (run, stage, probe, layer)."""
    if phases.empty:
        return "no phases: the table has no trajectory with both RankMe and alpha-ReQ"
    blocks = []
    shown = ["phase", "start_step", "end_step", "start_tokens", "end_tokens",
             "rankme_start", "rankme_end", "alpha_start", "alpha_end", "relative_change"]
    for (run, stage, probe, layer), group in phases.groupby(["run", "stage", "probe", "layer"], sort=False):
        body = group[shown].to_string(
            index=False, float_format=lambda v: f"{v:.3g}",
            formatters={"relative_change": lambda v: f"{v:+.1%}"},
        )
        blocks.append(f"{run} / {stage} / {probe} / layer {layer}\n{body}")
    return "\n\n".join(blocks)
