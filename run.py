"""The one-command demo: train the default model, probe every checkpoint, find phases, draw plots.

  python run.py                              # the embedded associative-pairs corpus, ~3-4 min on 2 CPU cores
  python run.py --workdir=/tmp/run1 --config=experiments/configs/pretrain.py:small --config.train.steps=20000

Every stage resumes: rerunning the same command continues training from the latest
checkpoint, probes only checkpoints without results, and redraws the plots. The stages can
also be run alone: experiments/pretrain.py, experiments/probe.py, experiments/plot.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from entropy_jax import analysis, train  # noqa: E402
from entropy_jax.cli import setup_logging, summarise_training, user_errors  # noqa: E402
from entropy_jax.probes.sweep import sweep  # noqa: E402
from entropy_jax.sharding import initialize_distributed, is_writer  # noqa: E402

config_flags.DEFINE_config_file(
    "config", str(Path(__file__).parent / "experiments/configs/pretrain.py") + ":tiny",
    "Config file and preset (default: the tiny demo); keys overridable as --config.train.steps=N.",
    lock_config=True,
)
flags.DEFINE_string("workdir", "runs/demo", "Output folder (checkpoints, metrics.jsonl, probes/, plots/).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed()
    setup_logging()
    workdir = Path(flags.FLAGS.workdir).absolute()
    logging.info("workdir: %s", workdir)
    with user_errors():
        result = train.train(flags.FLAGS.config, workdir)
        report = sweep(workdir)
    if not is_writer():
        return
    table = analysis.load_results(workdir)
    metrics = analysis.load_train_metrics(workdir)
    phases = analysis.detect_phases(table, train_metrics=metrics)
    phases_path = analysis.write_phases(phases, workdir)
    pngs = analysis.plot_all(workdir)
    print("\n" + summarise_training(result))
    print(f"probe results: {report.results_path} ({report.rows_added} rows added this run)")
    print(f"phases: {phases_path}\n{analysis.format_phases(phases)}")
    print("plots:\n" + "\n".join(f"  {p}" for p in pngs), flush=True)
    if report.skipped:
        print(f"skipped unreadable checkpoints: {[s for s, _ in report.skipped]}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
