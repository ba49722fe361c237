r"""Redraw a run's plots and phase table from its probe results table.

  python experiments/plot.py --workdir=runs/demo [--probe=last_token] [--layer=2]

Reads ``workdir/probes/results.parquet`` (or ``.csv``), ``workdir/metrics.jsonl`` and
``workdir/probes/spectra/`` when present; writes PNGs to ``workdir/plots/`` and the phase table to
``workdir/probes/phases.csv``. Figures whose inputs are absent (e.g. no attention rows) are skipped
with a log line. All logic lives in ``entropy_jax.analysis``.

The workdir, --probe and --layer are checked against the results table before anything is drawn.
Exit status: 0 done; 2 bad input (one line "error: ..."; nothing written), including a read-only
workdir; 1 an unexpected error (a bug, with its traceback).
"""

from __future__ import annotations

from absl import flags, logging

from entropy_jax import cli, validate
from entropy_jax.analysis import analyse
from entropy_jax.cli import start, user_errors

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory holding probes/results.parquet (written by experiments/probe.py).",
    required=True,
)
_PROBE = flags.DEFINE_string(
    "probe", None, "Probe whose trajectory, heatmap and spectra to draw (default: last_token if present).",
)
_LAYER = flags.DEFINE_integer(
    "layer", None, "Layer for the trajectory and spectra plots (default: the probe's final layer, after the "
    "final norm).",
)


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        workdir = validate.check_plot_request(_WORKDIR.value, _PROBE.value, _LAYER.value)
        report = analyse(workdir, probe=_PROBE.value, layer=_LAYER.value)
    logging.info("%s", report)


if __name__ == "__main__":
    cli.run(main)
