"""Probe every checkpoint of a run: append rows to <workdir>/probes/results.parquet.

  python experiments/probe.py --workdir=/tmp/run1

Resumable: rows already in the table are not recomputed, so rerunning after a crash, or
after adding a probe to the config, computes only what is missing. The probes and the probe
set come from the run's own config unless --config names another, e.g.
  python experiments/probe.py --workdir=/tmp/run1 --config=experiments/configs/pretrain.py:tiny \
      --config.probes.last_token.dse_sigma=10
The workdir and the --config sections are checked before anything is written.
Exit status: 0 done; 3 done, but some checkpoints could not be read (each is reported and
skipped); 2 bad input (one line "error: ..."; nothing written), including a full disk or a
read-only workdir; 1 an unexpected error (a bug, with its traceback).
"""

from __future__ import annotations

import sys

from absl import flags

from entropy_jax import cli, validate
from entropy_jax.cli import start, user_errors
from entropy_jax.sweep import sweep

cli.define_config_flag(
    None, "Optional config whose probe_set and probes sections replace the run's own (e.g. to add a probe).",
)
flags.DEFINE_string("workdir", None, "Run folder holding checkpoints/ (as written by experiments/pretrain.py).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        workdir = validate.check_probe_workdir(flags.FLAGS.workdir, flags.FLAGS.config)
        report = sweep(workdir, flags.FLAGS.config)
    print(f"probed {len(report.probed_steps)} checkpoints, added {report.rows_added} rows to {report.results_path}")
    if report.skipped:
        for step, reason in report.skipped:
            print(f"skipped step {step}: {reason}", file=sys.stderr)
        sys.exit(cli.EXIT_SKIPPED)


if __name__ == "__main__":
    cli.run(main)
