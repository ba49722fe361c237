"""Pretrain a decoder-only LM, saving log-spaced Orbax checkpoints to --workdir.

  python experiments/pretrain.py --config=experiments/configs/pretrain.py:tiny --workdir=/tmp/tiny

Rerunning the same command resumes from the latest checkpoint in --workdir. Override any
config key with --config.<key>=<value>, e.g. --config.train.steps=200.
"""

from __future__ import annotations

from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from entropy_jax import train
from entropy_jax.cli import start, summarise_training, user_errors

CONFIGS = Path(__file__).parent / "configs"
config_flags.DEFINE_config_file(
    "config", str(CONFIGS / "pretrain.py") + ":tiny",
    "Config file and preset, e.g. experiments/configs/pretrain.py:small; keys overridable as --config.train.steps=N.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir", None, "Output folder for checkpoints and metrics.jsonl; resumes if it already holds checkpoints."
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start(argv)
    with user_errors():
        result = train.train(flags.FLAGS.config, flags.FLAGS.workdir)
    print(summarise_training(result), flush=True)


if __name__ == "__main__":
    app.run(main)
