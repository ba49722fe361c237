"""The layout of a run directory: the one place that spells its paths.

```
<workdir>/
  run_id                      a stable id written once (lineage metadata and the results table use it)
  checkpoints/<step>/...      Orbax checkpoints (entropy_jax.checkpoint)
  metrics.jsonl               one JSON object per logged training step
  probes/probe_set.npz        the fixed probe sequences and their sha256
  probes/results.parquet      the tidy results table (results.csv where pyarrow is absent)
  probes/spectra/step_<step:08d>.npz
  probes/phases.csv           phase boundaries
  plots/*.png
```
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of one run directory (nothing is created until a writer asks)."""

    root: Path

    def __init__(self, root: str | Path):
        object.__setattr__(self, "root", Path(root).absolute())

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    @property
    def probe_set(self) -> Path:
        return self.probes / "probe_set.npz"

    @property
    def results(self) -> Path:
        """The results table: Parquet, unless only a CSV one exists."""
        parquet, csv = self.probes / "results.parquet", self.probes / "results.csv"
        return csv if csv.exists() and not parquet.exists() else parquet

    @property
    def spectra(self) -> Path:
        return self.probes / "spectra"

    def spectra_file(self, step: int) -> Path:
        return self.spectra / f"step_{step:08d}.npz"

    @property
    def phases(self) -> Path:
        return self.probes / "phases.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def run_id_file(self) -> Path:
        return self.root / "run_id"

    def run_id(self, create: bool = False) -> str:
        """The run's stable id: read from ``run_id``; with ``create``, written once if absent.

        A workdir without one (written before run ids existed, or read-only) is named by its folder.
        """
        if self.run_id_file.exists():
            return self.run_id_file.read_text().strip()
        if not create:
            return self.name
        run_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        write_text_atomic(self.run_id_file, run_id + "\n")
        return run_id


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn (half-written) last line is ignored, any other bad line raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a write interrupted mid-line: the row was never complete
                break
            raise ValueError(f"{path}, line {i + 1}, is not valid JSON ({e}); fix or delete that line") from e
    return rows
