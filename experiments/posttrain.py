"""Fine-tune a pretrained checkpoint: SFT, DPO or RL with verifiable rewards, with lineage.

  python experiments/posttrain.py --config=experiments/configs/sft.py:tiny  --init_from=runs/pre --workdir=runs/sft
  python experiments/posttrain.py --config=experiments/configs/dpo.py:tiny  --init_from=runs/sft --workdir=runs/dpo
  python experiments/posttrain.py --config=experiments/configs/rlvr.py:tiny --init_from=runs/dpo --workdir=runs/rlvr

--init_from (a run folder) and --init_step (default: its latest checkpoint) pick the starting
checkpoint; it is recorded as the parent in every checkpoint's metadata, tokens seen continue
from it, and the probes use the lineage root's probe set. DPO and GRPO compare the policy with
that checkpoint, frozen. Rerunning the same command resumes exactly, like pretraining.
Exit status as for experiments/pretrain.py: 0 done, 2 bad input (one line "error: ...").
"""

from __future__ import annotations

from pathlib import Path

from absl import flags

from entropy_jax import cli
from entropy_jax.cli import apply_init_flags, start, summarise_training, train_with_probes, user_errors
from entropy_jax.train.reference import prepare_stage

CONFIGS = Path(__file__).parent / "configs"
cli.define_config_flag(
    str(CONFIGS / "sft.py") + ":tiny",
    "Stage config and preset: experiments/configs/{sft,dpo,rlvr}.py:{tiny,test}; keys overridable as "
    "--config.train.steps=N.",
)
flags.DEFINE_string("workdir", None, "Output folder of this stage; resumes if it already holds checkpoints.")
flags.DEFINE_string("init_from", None, "Run folder to start from (= --config.init_from.workdir); required unless "
                    "--workdir already holds this stage's checkpoints.")
flags.DEFINE_integer("init_step", None, "Checkpoint step of --init_from (default: its latest; "
                     "= --config.init_from.step).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    start(argv)
    cfg, workdir = flags.FLAGS.config, flags.FLAGS.workdir
    with user_errors():
        apply_init_flags(cfg, flags.FLAGS.init_from, flags.FLAGS.init_step)
        prepare_stage(cfg, workdir)
        result = train_with_probes(cfg, workdir)
    print(summarise_training(result), flush=True)


if __name__ == "__main__":
    cli.run(main)
