r"""Redraw a run's plots and phase table from its probe results table.

  python experiments/plot.py --workdir=runs/demo [--probe=last_token] [--layer=2]

Reads ``workdir/probes/results.parquet`` (or ``.csv``), ``workdir/metrics.jsonl`` and
``workdir/probes/spectra/`` when present; writes PNGs to ``workdir/plots/`` and the phase table to
``workdir/probes/phases.csv``. Figures whose inputs are absent (e.g. no attention rows) are skipped
with a log line. All logic lives in ``entropy_jax.analysis``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging

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
    workdir = Path(_WORKDIR.value)
    if not workdir.is_dir():
        sys.exit(f"error: workdir {workdir} does not exist")
    with user_errors():
        report = analyse(workdir, probe=_PROBE.value, layer=_LAYER.value)
    logging.info("%s", report)


if __name__ == "__main__":
    app.run(main)
