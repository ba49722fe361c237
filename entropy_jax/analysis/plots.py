"""Figures of a run's representation geometry, drawn from the results table (PNG, no screen needed).

Each ``make_*_figure`` returns a :class:`matplotlib.figure.Figure` built without pyplot (so it works
under any backend, notebooks included); each ``plot_*`` wrapper saves one to a path and returns the path.
:func:`plot_all` draws every figure whose inputs exist in a workdir.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import BoundaryNorm, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from entropy_jax.analysis import phases as ph
from entropy_jax.analysis import results as res
from entropy_jax.probes.stats import numerical_rank
from entropy_jax.sharding import is_writer
from entropy_jax.workdir import Workdir

PHASE_COLOURS = {
    ph.WARMUP: "tab:orange", ph.ENTROPY_SEEKING: "tab:green", ph.COMPRESSION_SEEKING: "tab:purple",
}
STEP_LABEL = "training step (log scale)"
LOSS_COLUMNS = {
    "loss_minus_entropy_rate": "loss - entropy rate (nats/token)",
    "loss": "training loss (nats/token)",
}


def _log_step_axis(ax: Axes) -> None:
    # symlog keeps step 0 (initialisation) visible on an otherwise logarithmic step axis.
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel(STEP_LABEL)


def _shade_phases(ax: Axes, phases: pd.DataFrame | None) -> list[Patch]:
    """Shade labelled phases; return legend handles for the phases drawn."""
    if phases is None or phases.empty:
        return []
    drawn: dict[str, Patch] = {}
    for row in phases.itertuples():
        colour = PHASE_COLOURS.get(row.phase)
        if colour is not None:
            ax.axvspan(row.start_step, row.end_step, color=colour, alpha=0.15, lw=0)
            drawn[row.phase] = Patch(color=colour, alpha=0.3, label=row.phase)
    return list(drawn.values())


def _loss_twin(ax: Axes, train_metrics: pd.DataFrame | None) -> list:
    """Plot loss minus entropy rate (or the loss) on a twin y axis; return its line handles."""
    # Non-finite values are logged as null (NaN here); a column of nulls falls back to the plain loss.
    column = next((c for c in LOSS_COLUMNS if train_metrics is not None and c in train_metrics
                   and train_metrics[c].notna().any()), None)
    if column is None:
        return []
    curve = train_metrics[["step", column]].dropna()
    twin = ax.twinx()
    lines = twin.plot(curve["step"], curve[column], color="0.4", lw=1, label=LOSS_COLUMNS[column])
    if (curve[column] > 0).all():
        twin.set_yscale("log")
    twin.set_ylabel(LOSS_COLUMNS[column])
    return lines


def make_trajectory_figure(
    results: pd.DataFrame, train_metrics: pd.DataFrame | None = None, phases: pd.DataFrame | None = None,
    *, probe: str | None = None, layer: int | None = None, rankme_metric: str | None = None,
) -> Figure:
    """RankMe (with the loss on a twin axis) and alpha-ReQ against log step, labelled phases shaded."""
    probe = probe or res.default_probe(results)
    layer = res.final_layer(results, probe) if layer is None else layer
    rankme_metric = rankme_metric or ph.pick_rankme_metric(results)
    if phases is not None and not phases.empty:
        phases = phases[(phases["probe"] == probe) & (phases["layer"] == layer)]
    fig = Figure(figsize=(8, 6.5), layout="constrained")
    ax_r, ax_a = fig.subplots(2, 1, sharex=True)
    rankme = res.metric_trajectory(results, rankme_metric, probe=probe, layer=layer)
    alpha = res.metric_trajectory(results, "alpha_req", probe=probe, layer=layer)
    lines = ax_r.plot(rankme["step"], rankme["value"], "o-", ms=3, color="tab:blue", label=rankme_metric)
    lines += _loss_twin(ax_r, train_metrics)
    ax_a.plot(alpha["step"], alpha["value"], "o-", ms=3, color="tab:red", label="alpha_req")
    patches = _shade_phases(ax_r, phases)
    _shade_phases(ax_a, phases)
    ax_r.set_ylabel(f"RankMe, {rankme_metric} (effective rank)")
    ax_a.set_ylabel("alpha-ReQ (power-law exponent)")
    ax_r.legend(handles=lines + patches, loc="best", fontsize="small")
    ax_a.legend(loc="best", fontsize="small")
    for ax in (ax_r, ax_a):
        _log_step_axis(ax)
    ax_r.set_title(f"Representation geometry: probe {probe}, layer {layer}")
    return fig


def _step_columns(ax: Axes, steps: np.ndarray, max_ticks: int = 8) -> None:
    ticks = np.unique(np.linspace(0, len(steps) - 1, min(max_ticks, len(steps))).round().astype(int))
    ax.set_xticks(ticks, [str(int(steps[i])) for i in ticks])
    ax.set_xlabel("checkpoint step (one column per checkpoint, log-spaced)")


def make_layer_heatmap_figure(
    values: pd.DataFrame, *, title: str, colorbar_label: str, layer_label: str = "layer"
) -> Figure:
    """Heatmap of ``value`` over layer (rows) x checkpoint step (columns); duplicates are averaged."""
    grid = values.pivot_table(index="layer", columns="step", values="value", aggfunc="mean")
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(len(grid.index)), [str(i) for i in grid.index])
    _step_columns(ax, grid.columns.to_numpy())
    ax.set_ylabel(layer_label)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar_label)
    return fig


def rankme_by_layer(results: pd.DataFrame, probe: str, rankme_metric: str | None = None) -> pd.DataFrame:
    """RankMe rows (layer, step, value) of one probe, all layers."""
    metric = rankme_metric or ph.pick_rankme_metric(results)
    rows = results[(results["probe"] == probe) & (results["metric"] == metric) & (results["head"] == -1)]
    return rows[["layer", "step", "value"]]


def attention_entropy_by_layer(results: pd.DataFrame) -> pd.DataFrame:
    """Mean attention entropy per (layer, step): the per-layer rows if present, else the mean over heads."""
    rows = results[results["metric"] == "attention_entropy"]
    per_layer = rows[rows["head"] == -1]
    if per_layer.empty:
        per_layer = rows.groupby(["layer", "step"], as_index=False)["value"].mean()
    return per_layer[["layer", "step", "value"]]

BOUND_METRICS = {
    "attention_entropy_bound_row": "row-wise s = ||z_i||_2",
    "attention_entropy_bound_logits": "s = spectral norm of the logit matrix",
    "attention_entropy_bound_weights": "s = ||W_K W_Q^T||_2 ||X X^T||_2",
}


def make_attention_bound_figure(results: pd.DataFrame, *, bound_metric: str | None = None) -> Figure:
    """Per-head attention entropy (solid) and its Zhai et al. (2023) Thm 3.1 lower bound (dashed), nats."""
    heads = results[results["head"] >= 0]
    bound_metric = bound_metric or next((m for m in BOUND_METRICS if m in set(heads["metric"])), None)
    if bound_metric is None:
        raise ValueError(f"no per-head attention entropy bound rows ({', '.join(BOUND_METRICS)})")
    layers = sorted(heads.loc[heads["metric"] == "attention_entropy", "layer"].unique())
    ncols = min(len(layers), 3)
    nrows = -(-len(layers) // ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, sharey=True, squeeze=False)).ravel()
    for ax, layer in zip(axes, layers, strict=False):
        for colour_index, head in enumerate(sorted(heads.loc[heads["layer"] == layer, "head"].unique())):
            colour = f"C{colour_index % 10}"
            for metric, style in (("attention_entropy", "-"), (bound_metric, "--")):
                rows = heads[(heads["metric"] == metric) & (heads["layer"] == layer)
                             & (heads["head"] == head)]
                curve = rows.groupby("step", as_index=False)["value"].mean()
                ax.plot(curve["step"], curve["value"], style, color=colour,
                        label=f"head {head}" if style == "-" else None)
        _log_step_axis(ax)
        ax.set_ylabel("attention entropy (nats)")
        ax.set_title(f"layer {layer}")
        ax.legend(fontsize="x-small", title="solid: measured\ndashed: bound", title_fontsize="x-small")
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    variant = BOUND_METRICS.get(bound_metric, bound_metric)
    fig.suptitle(f"Attention entropy vs Zhai et al. Theorem 3.1 lower bound ({variant})")
    return fig


def make_spectra_figure(
    spectra: dict[int, dict[str, np.ndarray]], *, key: str, max_curves: int = 8
) -> Figure:
    """Normalised covariance eigenvalue vs rank (log-log) for up to ``max_curves`` checkpoints, by step."""
    steps = [s for s in sorted(spectra) if key in spectra[s]]
    if not steps:
        raise ValueError(f"no spectrum named {key!r} in any checkpoint")
    picks = np.unique(np.linspace(0, len(steps) - 1, min(max_curves, len(steps))).round().astype(int))
    chosen = [steps[i] for i in picks]
    cmap = ListedColormap(colormaps["viridis"](np.linspace(0.0, 0.9, len(chosen))))
    norm = BoundaryNorm(np.arange(len(chosen) + 1) - 0.5, cmap.N)
    fig = Figure(figsize=(7, 5), layout="constrained")
    ax = fig.subplots()
    for i, step in enumerate(chosen):
        eigenvalues = np.asarray(spectra[step][key], dtype=np.float64)
        # Only the numerical rank: a LayerNorm null direction would otherwise add a ~1e-16 cliff.
        eigenvalues = eigenvalues[: numerical_rank(eigenvalues)]
        ax.loglog(np.arange(1, len(eigenvalues) + 1), eigenvalues, color=cmap(i), lw=1.2)
    ax.set_xlabel("rank r")
    ax.set_ylabel("normalised eigenvalue (share of variance)")
    ax.set_title(f"Covariance eigenspectra: {key}")
    colorbar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, ticks=np.arange(len(chosen)))
    colorbar.ax.set_yticklabels([str(s) for s in chosen])
    colorbar.set_label("checkpoint step")
    return fig


DSE_PANELS = {
    "dse_bits": "DSE at the median pairwise distance (bits)",
    "dse_bits_sigma10": "DSE at fixed sigma = 10 (bits)",
    "dse_sigma": "median pairwise distance (feature units)",
}


def make_dse_figure(results: pd.DataFrame, *, probe: str | None = None) -> Figure:
    """Diffusion spectral entropy against log step, one line per layer: at the median-distance
    bandwidth, at the official fixed sigma, and the bandwidth itself (what the fixed sigma ignores)."""
    probe = probe or res.default_probe(results)
    rows = results[(results["probe"] == probe) & (results["head"] == -1)]
    panels = [m for m in DSE_PANELS if m in set(rows["metric"])]
    if "dse_bits" not in panels:
        raise ValueError(f"no dse_bits rows for probe {probe!r} in the results table")
    fig = Figure(figsize=(4.6 * len(panels), 4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True))
    layers = sorted(rows.loc[rows["metric"] == "dse_bits", "layer"].unique())
    for ax, metric in zip(axes, panels, strict=True):
        for layer in layers:
            curve = res.metric_trajectory(rows, metric, probe=probe, layer=layer)
            ax.plot(curve["step"], curve["value"], "o-", ms=3, color=colormaps["viridis"](layer / max(layers[-1], 1)),
                    label=f"layer {layer}")
        _log_step_axis(ax)
        ax.set_ylabel(DSE_PANELS[metric])
    axes[0].legend(fontsize="small")
    n = rows.loc[rows["metric"] == "dse_n", "value"]
    fig.suptitle(f"Diffusion spectral entropy: probe {probe}" + (f", N = {int(n.max())} rows" if len(n) else ""))
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 110) -> Path:
    """Save ``fig`` as PNG at ``path`` (folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_trajectories(
    results: pd.DataFrame, train_metrics: pd.DataFrame | None, phases: pd.DataFrame | None, path: str | Path,
    **kwargs,
) -> Path:
    """Save :func:`make_trajectory_figure` (kwargs: probe, layer, rankme_metric) to ``path``."""
    return save_figure(make_trajectory_figure(results, train_metrics, phases, **kwargs), path)


def plot_rankme_heatmap(results: pd.DataFrame, path: str | Path, *, probe: str | None = None) -> Path:
    """Save the layer x step heatmap of RankMe for ``probe`` to ``path``."""
    probe = probe or res.default_probe(results)
    fig = make_layer_heatmap_figure(
        rankme_by_layer(results, probe), title=f"RankMe ({ph.pick_rankme_metric(results)}) by layer: {probe}",
        colorbar_label="RankMe (effective rank)", layer_label="layer (0 = embedding, L = after final norm)",
    )
    return save_figure(fig, path)


def plot_attention_heatmap(results: pd.DataFrame, path: str | Path) -> Path:
    """Save the layer x step heatmap of mean attention entropy (nats) to ``path``."""
    fig = make_layer_heatmap_figure(
        attention_entropy_by_layer(results), title="Mean attention entropy by layer",
        colorbar_label="attention entropy (nats)", layer_label="layer (transformer block)",
    )
    return save_figure(fig, path)


def plot_attention_bound(results: pd.DataFrame, path: str | Path) -> Path:
    """Save :func:`make_attention_bound_figure` to ``path``."""
    return save_figure(make_attention_bound_figure(results), path)


def plot_spectra(spectra: dict[int, dict[str, np.ndarray]], path: str | Path, *, key: str) -> Path:
    """Save :func:`make_spectra_figure` for the spectra named ``key`` to ``path``."""
    return save_figure(make_spectra_figure(spectra, key=key), path)


def plot_dse(results: pd.DataFrame, path: str | Path, *, probe: str | None = None) -> Path:
    """Save :func:`make_dse_figure` for ``probe`` to ``path``."""
    return save_figure(make_dse_figure(results, probe=probe), path)


def plot_all(workdir: str | Path, *, probe: str | None = None, layer: int | None = None) -> list[Path]:
    """Draw every figure whose inputs exist into ``workdir/plots/``; log and skip the others.
    Holds the workdir's lock while drawing.

    Raises FileNotFoundError if the results table itself is missing, WorkdirBusyError if another
    process (training, a sweep) holds the workdir.
    """
    with Workdir(workdir).lock("plotting", enabled=is_writer(), create=False):
        return _plot_all(Workdir(workdir), probe, layer)


def _plot_all(workdir: Workdir, probe: str | None, layer: int | None) -> list[Path]:
    out = workdir.plots
    results = res.load_results(workdir)
    train_metrics = res.load_optional(res.load_train_metrics, workdir, "the loss curve")
    spectra = res.load_optional(res.load_spectra, workdir, "the eigenspectra plot")
    probe = probe or res.default_probe(results)
    layer = res.final_layer(results, probe) if layer is None else layer
    phases = ph.detect_phases(results, train_metrics=train_metrics, probe=probe, layer=layer)
    paths = [
        plot_trajectories(results, train_metrics, phases, out / f"trajectory_{probe}_layer{layer}.png",
                          probe=probe, layer=layer),
        plot_rankme_heatmap(results, out / f"heatmap_rankme_{probe}.png", probe=probe),
    ]
    metrics = set(results["metric"])
    if "attention_entropy" in metrics:
        paths.append(plot_attention_heatmap(results, out / "heatmap_attention_entropy.png"))
    else:
        logging.info("skipping attention plots: no attention_entropy rows in the results table")
    if "attention_entropy" in metrics and metrics & set(BOUND_METRICS):
        paths.append(plot_attention_bound(results, out / "attention_entropy_bound.png"))
    if "dse_bits" in set(results.loc[results["probe"] == probe, "metric"]):
        paths.append(plot_dse(results, out / f"dse_{probe}.png", probe=probe))
    key = f"{probe}_layer{layer}"
    if spectra is not None and any(key in arrays for arrays in spectra.values()):
        paths.append(plot_spectra(spectra, out / f"spectra_{key}.png", key=key))
    elif spectra is not None:
        logging.info("skipping the eigenspectra plot: no spectrum named %s", key)
    return paths
