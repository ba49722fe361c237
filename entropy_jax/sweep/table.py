"""The append-only results table: one row per (run, stage, step, probe, layer, head, metric).

Stored as ``workdir/probes/results.parquet`` (``results.csv`` where pyarrow is absent). Columns:
:data:`RESULTS_COLUMNS`. ``run`` is the run's stable id (``Workdir.run_id``), so a renamed or
copied workdir keeps its rows; ``layer`` and ``head`` are -1 where they do not apply; ``note``
says why a value is NaN or a limit (e.g. a collapsed representation), and is empty otherwise.
Every append rewrites the file through a unique temporary file and an atomic rename, so a
sweep killed at any moment leaves the previous complete table, never a truncated one. The
Parquet file also records the sha256 of the probe set its rows were computed on
(``attrs["probe_set_sha256"]``), so rows of two probe sets are never mixed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from entropy_jax.errors import UserError
from entropy_jax.workdir import Workdir, atomic_path

RESULTS_COLUMNS: tuple[str, ...] = (
    "run", "stage", "step", "tokens_seen", "ckpt_hash", "probe", "layer", "head", "metric", "value", "note",
)
KEY_COLUMNS = ("run", "stage", "step", "probe", "layer", "head", "metric")
RowKey = tuple[str, int, int, str]  # (probe, layer, head, metric) within one checkpoint
_INT_COLUMNS = ("step", "tokens_seen", "layer", "head")
_STR_COLUMNS = ("run", "stage", "ckpt_hash", "probe", "metric", "note")
_OPTIONAL = {"note": ""}  # columns that tables written by earlier versions lack

try:
    import pyarrow

    _PARQUET = True
    _UNREADABLE: tuple[type[Exception], ...] = (ValueError, pyarrow.ArrowException)
except ImportError:  # pragma: no cover - pyarrow is an install requirement
    _PARQUET = False
    _UNREADABLE = (ValueError,)


class DamagedTableError(UserError):
    """A results table that cannot be read (truncated, overwritten): left untouched, to be moved aside."""


def _read(path: Path) -> pd.DataFrame:
    try:
        table = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(
            path, keep_default_na=False, na_values={"value": ["", "nan"]})
    except _UNREADABLE as e:  # a truncated or garbage file: say so in one line, touch nothing
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DamagedTableError(f"results table {path} is damaged ({type(e).__name__}: {first}); move it aside "
                                f"(mv {path} {path}.damaged) and rerun experiments/probe.py, which recomputes "
                                "it from the checkpoints") from None
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
    """The writer: knows which keys are present and appends only new rows (one writer at a time:
    the caller holds the workdir's lock)."""

    def __init__(self, workdir: Workdir):
        self.path = workdir.results if _PARQUET else workdir.results_csv
        if self.path.exists():
            self.frame = _read(self.path)
        else:
            self.frame = pd.DataFrame({c: pd.Series(dtype=object) for c in RESULTS_COLUMNS})
        self._keys = {tuple(r) for r in self.frame[list(KEY_COLUMNS)].itertuples(index=False)}

    @property
    def probe_set_sha256(self) -> str | None:
        """The probe set the stored rows were computed on (None: no rows, or a CSV / older table)."""
        return self.frame.attrs.get("probe_set_sha256")

    def present(self, run: str, stage: str, step: int) -> set[RowKey]:
        """Row keys (probe, layer, head, metric) already stored for one checkpoint."""
        return {k[3:] for k in self._keys if k[:3] == (run, stage, step)}

    def drop_stale(self, run: str, stage: str, step: int, ckpt_hash: str) -> set[str]:
        """Forget (in memory; the next append writes it) the rows of one checkpoint computed from other
        parameters than ``ckpt_hash``: the workdir was retrained. Returns the stale hashes found."""
        if self.frame.empty:
            return set()
        mine = (self.frame["run"] == run) & (self.frame["stage"] == stage) & (self.frame["step"] == step)
        stale = mine & (self.frame["ckpt_hash"].astype(str) != ckpt_hash)
        if not stale.any():
            return set()
        hashes = set(self.frame.loc[stale, "ckpt_hash"].astype(str))
        self._keep(~stale)
        return hashes

    def drop_steps_except(self, run: str, steps: set[int]) -> list[int]:
        """Delete the rows of ``run`` at steps outside ``steps`` and write the table; returns those steps."""
        if self.frame.empty:
            return []
        gone = (self.frame["run"] == run) & ~self.frame["step"].isin(list(steps))
        if not gone.any():
            return []
        dropped = sorted(int(s) for s in self.frame.loc[gone, "step"].unique())
        self._keep(~gone)
        self._write()
        return dropped

    def _keep(self, mask: pd.Series) -> None:
        attrs = dict(self.frame.attrs)
        self.frame = self.frame.loc[mask].reset_index(drop=True)
        self.frame.attrs.update(attrs)
        self._keys = {tuple(r) for r in self.frame[list(KEY_COLUMNS)].itertuples(index=False)}

    def append(self, rows: list[dict], probe_set_sha256: str | None = None) -> int:
        """Add rows whose key is not yet present; write atomically. Returns the number added.

        ``probe_set_sha256`` is recorded with the table (Parquet only)."""
        new = [{**_OPTIONAL, **r} for r in rows if tuple(r[c] for c in KEY_COLUMNS) not in self._keys]
        if not new:
            return 0
        frame = pd.DataFrame(new, columns=list(RESULTS_COLUMNS))
        attrs = {**self.frame.attrs, **({"probe_set_sha256": probe_set_sha256} if probe_set_sha256 else {})}
        self.frame = frame if self.frame.empty else pd.concat([self.frame, frame], ignore_index=True)
        self.frame.attrs = attrs
        self._keys.update(tuple(r[c] for c in KEY_COLUMNS) for r in new)
        self._write()
        return len(new)

    def _write(self) -> None:
        with atomic_path(self.path) as tmp:
            if self.path.suffix == ".parquet":
                self.frame.to_parquet(tmp, index=False)
            else:
                self.frame.to_csv(tmp, index=False)
