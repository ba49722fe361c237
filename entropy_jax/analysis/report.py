"""The analysis step of a run: phase table and every plot, from what the workdir holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from entropy_jax.analysis import phases, plots, results
from entropy_jax.sharding import is_writer
from entropy_jax.workdir import Workdir


@dataclasses.dataclass(frozen=True)
class Report:
    phases: pd.DataFrame
    phases_path: Path
    plots: list[Path]

    def __str__(self) -> str:
        pngs = "\n".join(f"  {p}" for p in self.plots)
        return f"phases: {self.phases_path}\n{phases.format_phases(self.phases)}\nplots:\n{pngs}"


def analyse(workdir: str | Path, *, probe: str | None = None, layer: int | None = None) -> Report:
    """Detect phases (written to ``probes/phases.csv``) and draw all plots into ``plots/``.

    Raises FileNotFoundError when the workdir has no results table yet, WorkdirBusyError when another
    process (training, a sweep) holds the workdir: the analysis writes under its lock.
    """
    with Workdir(workdir).lock("the analysis", enabled=is_writer(), create=False):
        table = results.load_results(workdir)
        train_metrics = results.load_optional(results.load_train_metrics, workdir, "warmup inference")
        phase_table = phases.detect_phases(table, train_metrics=train_metrics)
        return Report(phase_table, phases.write_phases(phase_table, workdir),
                      plots.plot_all(workdir, probe=probe, layer=layer))
