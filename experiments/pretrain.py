"""Pretrain a decoder-only LM, saving log-spaced Orbax checkpoints to --workdir.

  python experiments/pretrain.py --config=experiments/configs/pretrain.py:tiny --workdir=/tmp/tiny

Rerunning the same command resumes from the latest checkpoint in --workdir. Override any
config key with --config.<key>=<value>, e.g. --config.train.steps=200. Start from another run's
checkpoint (fine-tuning on another corpus, say) with --init_from:
  python experiments/pretrain.py --config=experiments/configs/pretrain.py:tiny --config.data.name=markov \
      --init_from=runs/demo --config.stage=finetune --workdir=runs/demo_ft

The whole configuration is checked before anything is written (types, ranges, the batch against
the device count, the probe set against the data, a resumed workdir against its saved config).
Exit status: 0 done; 2 bad input (one line "error: ..."; nothing written), including a full disk
or a read-only workdir; 1 an unexpected error (a bug, with its traceback).
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from entropy_jax import cli
from entropy_jax.cli import apply_init_flags, start, summarise_training, train_with_probes, user_errors

CONFIGS = Path(__file__).parent / "configs"
cli.define_config_flag(
    str(CONFIGS / "pretrain.py") + ":tiny",
    "Config file and preset, e.g. experiments/configs/pretrain.py:small; keys overridable as --config.train.steps=N.",
)
flags.DEFINE_string(
    "workdir", None, "Output folder for checkpoints and metrics.jsonl; resumes if it already holds checkpoints."
)
flags.DEFINE_string("init_from", None, "Parent run folder to start from: its parameters and model state, a fresh "
                    "optimiser, step 0 (= --config.init_from.workdir). Ignored when --workdir holds checkpoints.")
flags.DEFINE_integer("init_step", None, "Checkpoint step of --init_from to start from (default: its latest; "
                     "= --config.init_from.step).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start(argv)
    cfg = flags.FLAGS.config
    with user_errors():
        apply_init_flags(cfg, flags.FLAGS.init_from, flags.FLAGS.init_step)
        result = train_with_probes(cfg, flags.FLAGS.workdir)
    print(summarise_training(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
