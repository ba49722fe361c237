"""RL with verifiable rewards (GRPO) on the tasks: ``--config=experiments/configs/rlvr.py:<preset>``.

Each step samples ``group_size`` answers per prompt (temperature ``temperature``, jitted, with a
KV cache), rewards 1 where the task checker accepts the answer, and takes a clipped policy-gradient
step on the group-normalised advantages (Shao et al. 2024) with a k3 KL penalty towards the
frozen reference (the checkpoint the stage starts from), stage ``rlvr``:
  python experiments/posttrain.py --config=experiments/configs/rlvr.py:tiny --init_from=runs/dpo \
      --workdir=runs/rlvr
Presets as in sft.py:
  tiny  100 steps of 32 prompts x 8 samples, lr 3e-4; metrics.jsonl logs reward_mean, pass_at_1
        (greedy, on held-out prompts) and kl. On the fact task from the tiny DPO checkpoint the
        reward is saturated: reward_mean 0.999 over the first 10 steps, 0.998 over the last 10;
        held-out exact match 1.00 -> 1.00, out of distribution 0.98 -> 0.99.
  small as tiny for the small pretraining preset, 30 steps.
  test  30 steps; what the tests run.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import sft


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = sft.posttrain_config(preset, "rlvr", "rl")
    c.train.steps = {"test": 30, "small": 30}.get(preset, 100)
    c.train.lr = 3e-3 if preset == "test" else 3e-4
    c.train.end_lr = c.train.lr / 10
    c.train.loss = ml_collections.ConfigDict(dict(
        name="grpo", group_size=8, temperature=1.0, clip_eps=0.2, kl_coef=0.02,
        reference_workdir="", reference_step=-1,  # "" = the checkpoint the stage starts from
    ))
    return c
