"""The append-only results table: one row per (run, stage, step, probe, layer, head, metric).

Stored as ``workdir/probes/results.parquet`` (``results.csv`` where pyarrow is absent). Every
append rewrites the file through a temporary file and an atomic rename, so a sweep killed at
any moment leaves the previous complete table, never a truncated one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from entropy_jax.analysis.results import RESULTS_COLUMNS, results_path

KEY_COLUMNS = ("run", "stage", "step", "probe", "layer", "head", "metric")
RowKey = tuple[str, int, int, str]  # (probe, layer, head, metric) within one checkpoint

try:
    import pyarrow  # noqa: F401

    _PARQUET = True
except ImportError:  # pragma: no cover - pyarrow is an install requirement
    _PARQUET = False


class ResultsTable:
    def __init__(self, workdir: str | Path):
        self.directory = Path(workdir) / "probes"
        self.path = results_path(workdir)
        if not _PARQUET:
            self.path = self.directory / "results.csv"
        if self.path.exists():
            self.frame = pd.read_parquet(self.path) if self.path.suffix == ".parquet" else pd.read_csv(self.path)
        else:
            self.frame = pd.DataFrame({c: pd.Series(dtype=object) for c in RESULTS_COLUMNS})
        self._keys = {tuple(r) for r in self.frame[list(KEY_COLUMNS)].itertuples(index=False)}

    def present(self, run: str, stage: str, step: int) -> set[RowKey]:
        """Row keys (probe, layer, head, metric) already stored for one checkpoint."""
        return {k[3:] for k in self._keys if k[:3] == (run, stage, step)}

    def append(self, rows: list[dict]) -> int:
        """Add rows whose key is not yet present; write atomically. Returns the number added."""
        new = [r for r in rows if tuple(r[c] for c in KEY_COLUMNS) not in self._keys]
        if not new:
            return 0
        frame = pd.DataFrame(new, columns=list(RESULTS_COLUMNS))
        self.frame = frame if self.frame.empty else pd.concat([self.frame, frame], ignore_index=True)
        self._keys.update(tuple(r[c] for c in KEY_COLUMNS) for r in new)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.suffix == ".parquet":
            self.frame.to_parquet(tmp, index=False)
        else:
            self.frame.to_csv(tmp, index=False)
        tmp.replace(self.path)
        return len(new)
