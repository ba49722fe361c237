"""Loaders, figures, plot_all, experiments/plot.py and the notebook, on a synthetic workdir on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import execute_notebook
from matplotlib.image import imread
from test_phases import STEPS, THREE_PHASES, TOKENS_PER_STEP, trajectory

from entropy_jax.analysis import plots, results

REPO = Path(__file__).resolve().parents[1]
N_LAYERS, N_HEADS, WIDTH = 2, 3, 32
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(probe: str, layer: int, head: int, metric: str, values: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(dict(
        run="synthetic", stage="pretrain", step=STEPS, tokens_seen=STEPS * TOKENS_PER_STEP,
        ckpt_hash=[f"h{s}" for s in STEPS], probe=probe, layer=layer, head=head, metric=metric,
        value=np.asarray(values, dtype=np.float64),
    ))


def synthetic_results(attention: bool = True) -> pd.DataFrame:
    """Representation rows for layers 0..N_LAYERS (+ attention and weight rows) in the tidy layout."""
    traj = trajectory(THREE_PHASES, noise=0.02, seed=0)
    frames = []
    for probe in ("last_token", "mean_token"):
        for layer in range(N_LAYERS + 1):
            scale = (layer + 1) / (N_LAYERS + 1)
            frames += [_rows(probe, layer, -1, "rankme_cov", traj["rankme"] * scale),
                       _rows(probe, layer, -1, "rankme", traj["rankme"] * scale * 1.1),
                       _rows(probe, layer, -1, "alpha_req", traj["alpha"]),
                       _rows(probe, layer, -1, "alpha_req_r2", np.full(len(STEPS), 0.95))]
    for layer in range(N_LAYERS):
        frames.append(_rows("weights", layer, -1, "spectral_norm", 1 + np.log1p(STEPS)))
        if not attention:
            continue
        for head in range(N_HEADS):
            entropy = 3.0 - 0.2 * (head + 1) * np.log1p(STEPS) / np.log1p(STEPS[-1])
            frames += [_rows("attention", layer, head, "attention_entropy", entropy)]
            for i, bound in enumerate(plots.BOUND_METRICS):
                frames.append(_rows("attention", layer, head, bound, entropy * (0.8 - 0.2 * i)))
        frames.append(_rows("attention", layer, -1, "attention_entropy", np.full(len(STEPS), 2.7 - layer)))
    return pd.concat(frames, ignore_index=True)


def write_workdir(workdir: Path, attention: bool = True, spectra: bool = True, csv: bool = False) -> Path:
    """Write results table, spectra and metrics.jsonl in exactly the on-disk format the loaders read."""
    probes_dir = workdir / "probes"
    probes_dir.mkdir(parents=True)
    table = synthetic_results(attention)
    if csv:
        table.to_csv(probes_dir / "results.csv", index=False)
    else:
        table.to_parquet(probes_dir / "results.parquet", index=False)
    if spectra:
        (probes_dir / "spectra").mkdir()
        for k, step in enumerate(STEPS):
            arrays = {}
            for layer in range(N_LAYERS + 1):
                ev = np.arange(1, WIDTH + 1, dtype=np.float64) ** -(0.5 + k / len(STEPS) + 0.1 * layer)
                arrays[f"last_token_layer{layer}"] = arrays[f"mean_token_layer{layer}"] = ev / ev.sum()
            np.savez(probes_dir / "spectra" / f"step_{step:08d}.npz", **arrays)
    with (workdir / "metrics.jsonl").open("w") as f:
        for step in range(1, int(STEPS[-1]) + 1, 16):
            loss = 2.0 + 3.0 / np.sqrt(step)
            row = dict(step=step, loss=loss, loss_minus_entropy_rate=loss - 2.0,
                       lr=3e-3 * min(step / 100, 1.0), tokens_seen=step * TOKENS_PER_STEP)
            f.write(json.dumps(row) + "\n")
    return workdir


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_workdir(tmp_path_factory.mktemp("run"))


def assert_png(path: Path, min_bytes: int = 10_000) -> None:
    assert path.exists() and path.stat().st_size > min_bytes, path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 200 and width > 200


def test_loaders(workdir: Path, tmp_path: Path) -> None:
    table = results.load_results(workdir)
    assert list(table.columns) == list(results.RESULTS_COLUMNS)
    assert table["step"].dtype == np.int64 and table["value"].dtype == np.float64
    csv_table = results.load_results(write_workdir(tmp_path / "csv", csv=True))
    pd.testing.assert_frame_equal(csv_table, table)
    metrics = results.load_train_metrics(workdir)
    assert {"step", "loss", "loss_minus_entropy_rate", "lr"} <= set(metrics.columns)
    spectra = results.load_spectra(workdir)
    assert sorted(spectra) == list(STEPS) and spectra[0]["last_token_layer2"].shape == (WIDTH,)
    with pytest.raises(FileNotFoundError, match="run experiments/probe.py --workdir="):
        results.load_results(tmp_path)
    with pytest.raises(FileNotFoundError, match="no spectra"):
        results.load_spectra(tmp_path)


def test_figures_are_labelled(workdir: Path) -> None:
    table = results.load_results(workdir)
    metrics = results.load_train_metrics(workdir)
    fig = plots.make_trajectory_figure(table, metrics, probe="last_token")
    ax_r, twin, ax_a = fig.axes[0], fig.axes[2], fig.axes[1]
    assert "RankMe" in ax_r.get_ylabel() and "alpha-ReQ" in ax_a.get_ylabel()
    assert twin.get_ylabel() == "loss - entropy rate (nats/token)"
    assert ax_a.get_xlabel() == plots.STEP_LABEL and ax_a.get_xscale() == "symlog"
    assert "layer 2" in ax_r.get_title()
    no_gap = metrics.assign(loss_minus_entropy_rate=np.nan)
    fig = plots.make_trajectory_figure(table, no_gap, probe="last_token")
    assert fig.axes[2].get_ylabel() == "training loss (nats/token)"
    heatmap = plots.make_layer_heatmap_figure(
        plots.attention_entropy_by_layer(table), title="t", colorbar_label="attention entropy (nats)")
    assert heatmap.axes[1].get_ylabel() == "attention entropy (nats)"
    bound = plots.make_attention_bound_figure(table)
    assert all(ax.get_ylabel() == "attention entropy (nats)" for ax in bound.axes[:N_LAYERS])
    assert "Theorem 3.1" in bound.get_suptitle()
    spectra = plots.make_spectra_figure(results.load_spectra(workdir), key="last_token_layer2", max_curves=5)
    assert spectra.axes[0].get_xscale() == "log" and spectra.axes[0].get_yscale() == "log"
    assert spectra.axes[0].get_xlabel() == "rank r" and spectra.axes[1].get_ylabel() == "checkpoint step"
    assert len(spectra.axes[0].get_lines()) == 5


def test_plot_all_draws_every_plot(workdir: Path) -> None:
    paths = plots.plot_all(workdir)
    names = sorted(p.name for p in paths)
    assert names == sorted([
        "trajectory_last_token_layer2.png", "heatmap_rankme_last_token.png", "heatmap_attention_entropy.png",
        "attention_entropy_bound.png", "spectra_last_token_layer2.png"])
    for path in paths:
        assert path.parent == workdir / "plots"
        assert_png(path)


def test_plot_all_skips_absent_inputs(tmp_path: Path) -> None:
    workdir = write_workdir(tmp_path / "bare", attention=False, spectra=False)
    paths = plots.plot_all(workdir, probe="mean_token", layer=1)
    expected = ["heatmap_rankme_mean_token.png", "trajectory_mean_token_layer1.png"]
    assert sorted(p.name for p in paths) == expected


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, str(REPO / "experiments" / "plot.py"), *args],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_cli(workdir: Path, tmp_path: Path) -> None:
    done = _run_cli(f"--workdir={workdir}", "--probe=last_token", "--layer=2")
    assert done.returncode == 0, done.stderr
    assert_png(workdir / "plots" / "trajectory_last_token_layer2.png")
    phases = pd.read_csv(workdir / "probes" / "phases.csv")
    assert "compression-seeking" in set(phases["phase"])
    missing = _run_cli(f"--workdir={tmp_path / 'nowhere'}")
    assert missing.returncode != 0 and "does not exist" in missing.stderr
    empty = _run_cli(f"--workdir={tmp_path}")
    assert empty.returncode != 0 and "no results table" in empty.stderr


def test_notebook_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    execute_notebook(workdir, monkeypatch)
