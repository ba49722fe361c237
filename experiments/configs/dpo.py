"""Direct preference optimisation on verifiable tasks: ``--config=experiments/configs/dpo.py:<preset>``.

Pairs of a correct (chosen) and a plausible wrong (rejected) answer to the same prompt; the frozen
reference is the checkpoint the stage starts from (Rafailov et al. 2023), stage ``dpo``:
  python experiments/posttrain.py --config=experiments/configs/dpo.py:tiny --init_from=runs/sft \
      --workdir=runs/dpo
Presets as in sft.py (the task and model of the pretraining preset):
  tiny  200 steps, beta 1.0, lr 3e-4, on the fact task (rejected: a Zipf-drawn key, see
        entropy_jax.data.facts.wrong_values). Measured from the tiny SFT checkpoint: held-out
        implicit-reward accuracy 0.93 in distribution, 0.91 out of distribution; greedy exact match
        stays 1.00 (OOD 1.00 -> 0.98); training reward_accuracy 0.84 -> 0.98. At beta 0.1 the held-out
        reward accuracy ends at 0.84 while exact match falls to 0.81 (OOD 0.43); with rejected
        answers the values of random other keys it ends at 0.68-0.71 (training pairs 0.94-0.99).
  small as tiny for the small pretraining preset, 60 steps.
  test  30 steps; what the tests run.
``train.loss.label_smoothing`` > 0 gives conservative DPO; ``reference_workdir`` empty means the
init checkpoint (filled in by experiments/posttrain.py and run.py).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import sft


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = sft.posttrain_config(preset, "dpo", "dpo")
    c.train.steps = {"test": 30, "small": 60}.get(preset, 200)
    c.train.lr = 3e-3 if preset == "test" else 3e-4
    c.train.end_lr = c.train.lr / 10
    c.train.loss = ml_collections.ConfigDict(dict(
        name="dpo", beta=1.0 if preset == "tiny" else 0.1, label_smoothing=0.0,
        reference_workdir="", reference_step=-1,  # "" = the checkpoint the stage starts from
    ))
    return c
