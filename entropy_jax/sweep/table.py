"""The append-only results table: one row per (run, stage, step, probe, layer, head, metric).

Stored as ``workdir/probes/results.parquet`` (``results.csv`` where pyarrow is absent). Columns:
:data:`RESULTS_COLUMNS`. ``run`` is the run's stable id (``Workdir.run_id``), so a renamed or
copied workdir keeps its rows; ``layer`` and ``head`` are -1 where they do not apply; ``note``
says why a value is NaN or a limit (e.g. a collapsed representation), and is empty otherwise.
Every append rewrites the file through a unique temporary file and an atomic rename, so a
sweep killed at any moment leaves the previous complete table, never a truncated one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import pandas as pd

from entropy_jax.workdir import Workdir

RESULTS_COLUMNS: tuple[str, ...] = (
    "run", "stage", "step", "tokens_seen", "ckpt_hash", "probe", "layer", "head", "metric", "value", "note",
)
KEY_COLUMNS = ("run", "stage", "step", "probe", "layer", "head", "metric")
RowKey = tuple[str, int, int, str]  # (probe, layer, head, metric) within one checkpoint
_INT_COLUMNS = ("step", "tokens_seen", "layer", "head")
_STR_COLUMNS = ("run", "stage", "ckpt_hash", "probe", "metric", "note")
_OPTIONAL = {"note": ""}  # columns that tables written by earlier versions lack

try:
    import pyarrow  # noqa: F401

    _PARQUET = True
except ImportError:  # pragma: no cover - pyarrow is an install requirement
    _PARQUET = False


def _read(path: Path) -> pd.DataFrame:
    table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False,
                                                                                 na_values={"value": ["", "nan"]})
    for column, default in _OPTIONAL.items():
        if column not in table.columns:
            table[column] = default
    return table


def load_results(workdir: str | Path) -> pd.DataFrame:
    """Read the tidy probe results table of ``workdir`` with typed columns, sorted by run, stage, step.

    Raises:
      FileNotFoundError: the workdir has no results table yet.
      ValueError: the table lacks one of :data:`RESULTS_COLUMNS`.
    """
    wd = Workdir(workdir)
    path = wd.results
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}: run experiments/probe.py --workdir={wd.root} first")
    table = _read(path)
    missing = [c for c in RESULTS_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"results table {path} lacks columns {missing}")
    for column in _INT_COLUMNS:
        table[column] = table[column].astype(np.int64)
    for column in _STR_COLUMNS:
        table[column] = table[column].fillna("").astype(str)
    table["value"] = table["value"].astype(np.float64)
    return table[list(RESULTS_COLUMNS)].sort_values(["run", "stage", "step"], kind="stable").reset_index(drop=True)


class ResultsTable:
    """The writer: knows which keys are present and appends only new rows."""

    def __init__(self, workdir: str | Path):
        wd = Workdir(workdir)
        self.path = wd.results if _PARQUET else wd.probes / "results.csv"
        if self.path.exists():
            self.frame = _read(self.path)
        else:
            self.frame = pd.DataFrame({c: pd.Series(dtype=object) for c in RESULTS_COLUMNS})
        self._keys = {tuple(r) for r in self.frame[list(KEY_COLUMNS)].itertuples(index=False)}

    def present(self, run: str, stage: str, step: int) -> set[RowKey]:
        """Row keys (probe, layer, head, metric) already stored for one checkpoint."""
        return {k[3:] for k in self._keys if k[:3] == (run, stage, step)}

    def append(self, rows: list[dict]) -> int:
        """Add rows whose key is not yet present; write atomically. Returns the number added."""
        new = [{**_OPTIONAL, **r} for r in rows if tuple(r[c] for c in KEY_COLUMNS) not in self._keys]
        if not new:
            return 0
        frame = pd.DataFrame(new, columns=list(RESULTS_COLUMNS))
        self.frame = frame if self.frame.empty else pd.concat([self.frame, frame], ignore_index=True)
        self._keys.update(tuple(r[c] for c in KEY_COLUMNS) for r in new)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
        if self.path.suffix == ".parquet":
            self.frame.to_parquet(tmp, index=False)
        else:
            self.frame.to_csv(tmp, index=False)
        tmp.replace(self.path)
        return len(new)
