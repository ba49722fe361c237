"""Load what a run leaves in its workdir: the probe results table, the training log and the spectra.

On-disk formats (written by the probe sweep and the training loop, read here):

- ``workdir/probes/results.parquet``: the tidy results table, read by :func:`load_results` (which
  lives with its writer, :mod:`entropy_jax.sweep.table`, and is re-exported here).
- ``workdir/probes/spectra/step_{step:08d}.npz``: per checkpoint, arrays named ``{probe}_layer{layer}``
  holding the normalised, centred covariance eigenvalues in descending order.
- ``workdir/metrics.jsonl``: one JSON object per logged training step, with at least ``step`` and
  ``loss`` (nats/token) and usually ``loss_minus_entropy_rate``, ``lr`` and ``tokens_seen``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import pandas as pd

from entropy_jax.sweep.table import RESULTS_COLUMNS, load_results
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.workdir import Workdir, atomic_path

__all__ = ["RESULTS_COLUMNS", "final_layer", "load_optional", "load_results", "load_spectra", "load_train_metrics",
           "metric_trajectory"]
T = TypeVar("T")
_SPECTRA_FILE = re.compile(r"step_(\d+)\.npz$")


def _missing(what: str, path: Path, workdir: str | Path, script: str) -> FileNotFoundError:
    return FileNotFoundError(f"no {what} at {path}: run {script} --workdir={workdir} first")


def load_train_metrics(workdir: str | Path) -> pd.DataFrame:
    """Read ``workdir/metrics.jsonl`` into a DataFrame sorted by step (a torn last line is ignored).

    Raises:
      FileNotFoundError: the file does not exist.
    """
    path = Workdir(workdir).metrics
    if not path.exists():
        raise _missing("training log", path, workdir, "experiments/pretrain.py")
    table = pd.DataFrame(read_metrics(path))
    if "step" not in table.columns:
        raise ValueError(f"training log {path} has no 'step' field")
    return table.sort_values("step", kind="stable").reset_index(drop=True)


def load_spectra(workdir: str | Path) -> dict[int, dict[str, np.ndarray]]:
    """Read every ``probes/spectra/step_*.npz`` of ``workdir`` as ``{step: {array name: eigenvalues}}``.

    Raises:
      FileNotFoundError: the spectra folder is absent or holds no ``step_*.npz`` file.
    """
    folder = Workdir(workdir).spectra
    spectra: dict[int, dict[str, np.ndarray]] = {}
    for path in sorted(folder.glob("step_*.npz")):
        match = _SPECTRA_FILE.search(path.name)
        if match is None:
            continue
        with np.load(path) as archive:
            spectra[int(match.group(1))] = {name: np.asarray(archive[name]) for name in archive.files}
    if not spectra:
        raise _missing("spectra", folder, workdir, "experiments/probe.py")
    return dict(sorted(spectra.items()))


def load_optional(loader: Callable[[Path], T], workdir: str | Path, purpose: str) -> T | None:
    """``loader(workdir)``, or None with a log line saying what is skipped when its file is missing."""
    try:
        return loader(Path(workdir))
    except FileNotFoundError as error:
        logging.info("skipping %s: %s", purpose, error)
        return None


def metric_trajectory(
    results: pd.DataFrame, metric: str, *, probe: str, layer: int, head: int = -1
) -> pd.DataFrame:
    """One metric of one (probe, layer, head) against step: columns ``step``, ``tokens_seen``, ``value``.

    Rows repeated at the same step (e.g. several runs) are averaged.
    """
    rows = results[
        (results["metric"] == metric)
        & (results["probe"] == probe)
        & (results["layer"] == layer)
        & (results["head"] == head)
    ]
    grouped = rows.groupby("step", sort=True).agg(tokens_seen=("tokens_seen", "max"), value=("value", "mean"))
    return grouped.reset_index()


def final_layer(results: pd.DataFrame, probe: str) -> int:
    """The largest layer index recorded for ``probe`` (layer L = after the final norm)."""
    layers = results.loc[results["probe"] == probe, "layer"]
    if layers.empty:
        raise ValueError(f"no rows for probe {probe!r}; probes present: {sorted(results['probe'].unique())}")
    return int(layers.max())


def default_probe(results: pd.DataFrame) -> str:
    """``last_token`` (the Tracing paper's probe) if it has RankMe rows, else the first probe that does."""
    probes = sorted(results.loc[results["metric"].isin(["rankme_cov", "rankme"]), "probe"].unique())
    if not probes:
        raise ValueError("results table has no RankMe rows to plot")
    return "last_token" if "last_token" in probes else probes[0]


def write_csv(table: pd.DataFrame, path: Path) -> Path:
    """Write ``table`` to ``path`` as CSV through a temporary file and an atomic rename; return ``path``."""
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path
