"""The analysis step of a run: phase table and every plot, from what the workdir holds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from entropy_jax.analysis import phases, plots, results
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.sharding import is_writer
from entropy_jax.workdir import Workdir, check_writable


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


def check_plot_request(value: str | None, probe: str | None, layer: int | None) -> Path:
    """``plot.py``'s input: a run folder with a results table holding ``probe`` at ``layer``."""
    wd = Workdir.from_flag(value)
    workdir = wd.root
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist: give a run folder (experiments/pretrain.py --workdir)")
    if not wd.results.exists():
        raise UserError(f"no results table at {wd.results}: run experiments/probe.py --workdir={workdir} first")
    table = results.load_results(workdir)
    probes = sorted(table["probe"].unique())
    if probe is not None and probe not in probes:
        raise UserError(f"--probe={probe} has no rows in {wd.results}{did_you_mean(probe, probes)} "
                        f"(probes: {', '.join(probes)})")
    if layer is not None:
        try:
            name = probe or results.default_probe(table)
        except ValueError as e:
            raise UserError(f"{e}: run experiments/probe.py with a representation probe first") from e
        layers = sorted(int(x) for x in table.loc[table["probe"] == name, "layer"].unique() if x >= 0)
        if layer not in layers:
            raise UserError(f"--layer={layer} is not a layer of probe {name!r} (layers: "
                            f"{', '.join(map(str, layers))})")
    check_writable(wd.plots, "plot.py")
    check_writable(wd.phases, "plot.py (probes/phases.csv)")
    return workdir
