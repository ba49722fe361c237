r"""Redraw runs' plots and phase tables from their probe results tables.

  python experiments/plot.py --workdir=runs/demo [--probe=last_token] [--layer=2]
  python experiments/plot.py --workdir=runs/pre --workdir=runs/sft --workdir=runs/dpo --workdir=runs/rlvr

For each --workdir: reads ``probes/results.parquet`` (or ``.csv``), ``metrics.jsonl`` and
``probes/spectra/`` when present; writes PNGs to ``plots/`` and the phase table to
``probes/phases.csv``. Figures whose inputs are absent (e.g. no attention rows) are skipped with a
log line. All logic lives in ``entropy_jax.analysis``.

Several workdirs: each gets its own plots, as above. When they are one lineage in the order
given (each the parent of the next, as recorded when a stage was started from the one before:
experiments/posttrain.py, run.py), the last one also gets the lifecycle across exactly those
stages: ``probes/stages.csv`` and ``plots/lifecycle_*.png`` (as run.py draws them). Runs of
which none started from another (seeds, presets) are plotted each on its own, without a lifecycle
figure. Workdirs that are linked but not in one chain in the order given (a stage left out, or
out of order) are refused, naming the missing link.

Every workdir, --probe and --layer are checked against the results tables before anything is
drawn. Exit status: 0 done; 2 bad input (one line "error: ..."; nothing written), including a
read-only workdir; 1 an unexpected error (a bug, with its traceback).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags, logging

from entropy_jax import cli
from entropy_jax.analysis import analyse, check_plot_request
from entropy_jax.analysis.lifecycle import analyse_lineage, given_lineage, lineage_results
from entropy_jax.cli import start, user_errors
from entropy_jax.errors import UserError

_WORKDIRS = flags.DEFINE_multi_string(
    "workdir", None, "Run directory holding probes/results.parquet (written by experiments/probe.py). Repeatable: "
    "each is plotted; stages of one lineage, given root first, also get the lifecycle figure in the last.",
    required=True,
)
_PROBE = flags.DEFINE_string(
    "probe", None, "Probe whose trajectory, heatmap and spectra to draw (default: last_token if present).",
)
_LAYER = flags.DEFINE_integer(
    "layer", None, "Layer for the trajectory and spectra plots (default: the probe's final layer, after the "
    "final norm).",
)


def check_request(values: list[str], probe: str | None, layer: int | None) -> tuple[list[Path], bool]:
    """The workdirs, each checked, and whether they form one lineage (then its probe sets must agree)."""
    workdirs = [check_plot_request(v, probe, layer) for v in values]
    if len({w.resolve() for w in workdirs}) < len(workdirs):  # runs/a and runs/b/../a are one run
        raise UserError(f"a --workdir is given twice ({', '.join(values)}): give each run once")
    lineage = given_lineage(workdirs)
    if lineage:
        lineage_results(workdirs)  # one probe set across the stages, else their numbers do not compare
    return workdirs, lineage


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        workdirs, lineage = check_request(_WORKDIRS.value, _PROBE.value, _LAYER.value)
        for workdir in workdirs:
            print(f"{workdir}:\n{analyse(workdir, probe=_PROBE.value, layer=_LAYER.value)}", flush=True)
        if lineage:
            print(analyse_lineage(workdirs[-1], probe=_PROBE.value, stages=workdirs), flush=True)
        elif len(workdirs) > 1:
            logging.info("none of the %d workdirs started from another: each plotted on its own, no lifecycle "
                         "figure", len(workdirs))


if __name__ == "__main__":
    cli.run(main)
