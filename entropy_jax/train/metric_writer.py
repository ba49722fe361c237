"""Per-step training metrics as JSON lines (``workdir/metrics.jsonl``), process 0 only.

On resume from step s the rows after s are dropped before writing resumes: the resumed run
recomputes them exactly, so the file always reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from entropy_jax.sharding import is_writer
from entropy_jax.workdir import read_jsonl, write_text_atomic


def _clean(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricWriter:
    def __init__(self, path: str | Path, resume_step: int | None = None, tensorboard: Path | None = None):
        """``tensorboard``: a folder to also write TensorBoard scalars to (needs tensorboardX), or None."""
        self.path = Path(path)
        self.enabled = is_writer()
        self._tb = None
        if not self.enabled:
            return
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = self.path.open("a", buffering=1)
        if tensorboard is not None:
            try:
                from tensorboardX import SummaryWriter  # optional sink
            except ImportError as e:
                raise ValueError("train.tensorboard=True needs tensorboardX: pip install tensorboardX") from e
            self._tb = SummaryWriter(str(tensorboard))

    def _truncate_after(self, step: int) -> None:
        rows = read_metrics(self.path)
        if len(rows) != sum(1 for line in self.path.read_text().splitlines() if line.strip()) or any(
                r["step"] > step for r in rows):  # rewrite only when something must go
            write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (a torn last line, from a killed writer, is ignored)."""
    return read_jsonl(Path(path))
