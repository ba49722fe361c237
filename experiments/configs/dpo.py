"""Direct preference optimisation on verifiable tasks: ``--config=experiments/configs/dpo.py:<preset>``.

Pairs of a correct (chosen) and a plausible wrong (rejected) answer to the same prompt; the frozen
reference is the checkpoint the stage starts from (Rafailov et al. 2023), stage ``dpo``:
  python experiments/posttrain.py --config=experiments/configs/dpo.py:tiny --init_from=runs/sft \
      --workdir=runs/dpo
Presets as in sft.py (the task and model of the pretraining preset):
  tiny  200 steps, beta 0.1, lr 3e-4: the implicit reward margin and the preference accuracy
        (metrics.jsonl: reward_margin, reward_accuracy) should rise from 0 and 0.5.
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
        name="dpo", beta=0.1, label_smoothing=0.0,
        reference_workdir="", reference_step=-1,  # "" = the checkpoint the stage starts from
    ))
    return c
