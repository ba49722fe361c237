"""The one-command demo: train the default model, probe every checkpoint, find phases, draw plots.

  python run.py                              # the embedded associative-pairs corpus, ~3-4 min on 2 CPU cores
  python run.py --workdir=/tmp/run1 --config=experiments/configs/pretrain.py:small --config.train.steps=20000

Every stage resumes: rerunning the same command continues training from the latest
checkpoint, probes only checkpoints without results, and redraws the plots. The stages can
also be run alone: experiments/pretrain.py, experiments/probe.py, experiments/plot.py.

The whole configuration is checked before anything is written. Exit status: 0 done; 2 bad input
(one line "error: ..."; nothing written), including a full disk or a read-only workdir; 3 done,
but some checkpoints could not be read and were skipped by the probe sweep; 1 an unexpected error
(a bug, with its traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags, logging

from entropy_jax import analysis, cli, validate
from entropy_jax.cli import start, summarise_training, train_with_probes, user_errors
from entropy_jax.sharding import is_writer
from entropy_jax.sweep import sweep

cli.define_config_flag(
    str(Path(__file__).parent / "experiments/configs/pretrain.py") + ":tiny",
    "Config file and preset (default: the tiny demo); keys overridable as --config.train.steps=N.",
)
flags.DEFINE_string("workdir", "runs/demo", "Output folder (checkpoints, metrics.jsonl, probes/, plots/).")


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        workdir = validate.workdir_path(flags.FLAGS.workdir)
        logging.info("workdir: %s", workdir)
        result = train_with_probes(flags.FLAGS.config, workdir)
        report = sweep(workdir)
        if not is_writer():
            return
        validate.check_plot_request(str(workdir), None, None)
        analysis_report = analysis.analyse(workdir)
    print("\n" + summarise_training(result))
    print(f"probe results: {report.results_path} ({report.rows_added} rows added this run)")
    print(analysis_report, flush=True)
    if report.skipped:
        print(f"skipped unreadable checkpoints: {[s for s, _ in report.skipped]}", file=sys.stderr)
        sys.exit(cli.EXIT_SKIPPED)


if __name__ == "__main__":
    cli.run(main)
