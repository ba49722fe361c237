r"""Probe every checkpoint of one or more runs: append rows to <workdir>/probes/results.parquet.

  python experiments/probe.py --workdir=/tmp/run1
  python experiments/probe.py --workdir=runs/pre --workdir=runs/sft --workdir=runs/dpo --workdir=runs/rlvr
  python experiments/probe.py --workdir=runs/pythia160m --config.probe_set.text_dir=/data/wikitext
  python experiments/probe.py --workdir=runs/pythia160m --shard_params      # FSDP: a model too big for one device

--workdir is repeatable: the workdirs are all checked first, then swept one after another in the
order given, each into its own table (a lineage's stages are probed on its root's sequences, so
experiments/plot.py can draw them together). Resumable: rows already in a table are not
recomputed, so rerunning after a crash, or after adding a probe, computes only what is missing.

The probes and the probe set are each run's own. ``--config.probe_set.<key>=`` overrides one key
of the probe set (experiments/configs/probe.py lists them: num_sequences, seq_len, batch_size;
for imported Hugging Face models the text, text_dir or tfds_name); the choice is saved with the
run and kept by later sweeps, and a run whose table holds rows on another probe set is refused.
A whole config file replaces the probes too, e.g. to add one:
  python experiments/probe.py --workdir=/tmp/run1 --config=experiments/configs/pretrain.py:tiny \
      --config.probes.last_token.dse_sigma=10
--shard_params restores each parameter split over the devices (its largest divisible axis);
the rows are those of the replicated default.

Exit status: 0 done; 3 done, but some checkpoints could not be read (each is reported and
skipped); 2 bad input (one line "error: ..."; nothing written), including a full disk or a
read-only workdir; 1 an unexpected error (a bug, with its traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import flags

from entropy_jax import cli
from entropy_jax.cli import start, user_errors
from entropy_jax.errors import UserError
from entropy_jax.sweep import sweep
from entropy_jax.sweep.probe_set import check_probe_workdir

cli.define_config_flag(
    str(Path(__file__).parent / "configs" / "probe.py"),
    "Probe-time overrides of each run's probe set (default: experiments/configs/probe.py, every key the "
    "run's own), e.g. --config.probe_set.text_dir=/data/wikitext; or a whole config whose probe_set and "
    "probes sections replace the run's.",
)
_WORKDIRS = flags.DEFINE_multi_string(
    "workdir", None, "Run folder holding checkpoints/ (experiments/pretrain.py, posttrain.py, import_hf.py). "
    "Repeatable: each is checked, then swept in the order given.", required=True,
)
_SHARD_PARAMS = flags.DEFINE_bool(
    "shard_params", False, "Restore the parameters sharded over the devices (FSDP-style) instead of replicated, "
    "so a model larger than one device's memory is probed.",
)


def check_workdirs(values: list[str], config) -> list[Path]:
    """Every workdir checked (and no duplicates) before any is swept."""
    workdirs = [check_probe_workdir(v, config) for v in values]
    seen = {}
    for value, workdir in zip(values, workdirs, strict=True):
        if workdir in seen:
            raise UserError(f"--workdir={value} is the same folder as --workdir={seen[workdir]}: give each run once")
        seen[workdir] = value
    return workdirs


def main(argv: list[str]) -> None:
    start(argv)
    skipped = []
    with user_errors():
        for workdir in check_workdirs(_WORKDIRS.value, flags.FLAGS.config):
            report = sweep(workdir, flags.FLAGS.config, shard_params=_SHARD_PARAMS.value)
            print(f"probed {len(report.probed_steps)} checkpoints, added {report.rows_added} rows to "
                  f"{report.results_path}", flush=True)
            skipped += [(workdir, step, reason) for step, reason in report.skipped]
    for workdir, step, reason in skipped:
        print(f"skipped step {step} of {workdir}: {reason}", file=sys.stderr)
    if skipped:
        sys.exit(cli.EXIT_SKIPPED)


if __name__ == "__main__":
    cli.run(main)
