"""Supervised fine-tuning on verifiable tasks: ``--config=experiments/configs/sft.py:<preset>``.

The stage starts from a pretraining checkpoint (same model and vocabulary) and trains next-token
loss on the answer tokens only (the prompt and the padding carry weight 0), stage ``sft``:
  python experiments/posttrain.py --config=experiments/configs/sft.py:tiny --init_from=runs/pre \
      --workdir=runs/sft
Presets follow the pretraining presets of experiments/configs/pretrain.py (the model, vocabulary
and sequence length must be the parent's):
  tiny  For the tiny pretraining demo: the assoc_pairs corpus's own facts (data.task=fact,
        entropy_jax.data.facts), prompt ``marker SEP k``, answer f(k). Keys of ranks [0, 512) are
        in distribution (96% of the pretraining keys): 256 of them held out (validation), the other
        252 trained on; the 256 rarest eligible keys (ranks 758-1015, each seen about 170-240 times
        in pretraining) are validation_ood. 300 steps of 32 examples, lr 3e-4 (20 warmup steps).
        Measured from the demo's pretraining checkpoint: greedy exact match on held-out keys 0.00
        -> 1.00 in distribution and 0.00 -> 1.00 out of distribution. At lr 3e-3 the model
        memorises the training keys instead (train keys 1.00, held-out 0.16 / OOD 0.01; lr 1e-3:
        0.64 / 0.14); with the prompt ``marker k SEP`` it memorises at lr 3e-3 too (held-out 0.00).
        Modular addition mod 10 (the previous task) stays at chance over 300 steps, as does
        in-context lookup of 4 pairs (data.task=lookup, task_size=4).
  small For the small pretraining preset (4 layers, width 128, V = 1024, T 256): the tiny preset's
        task, 100 steps (a step costs about 8x a tiny one on CPU).
  test  For the ``test`` pretraining preset (V = 64, 1-layer width 16): modular addition mod 5,
        40 steps; what the tests run.

dpo.py and rlvr.py build on :func:`posttrain_config`. Every key can be overridden on the command
line, e.g. ``--config.data.task=sort --config.data.task_size=5``.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import pretrain

# Tasks per pretraining preset: (kind, size). Prompt + answer must fit seq_len + 1 tokens.
TASKS = {"tiny": ("fact", 512), "small": ("add", 10), "test": ("add", 5)}
STEPS = {"tiny": 300, "small": 100, "test": 40}


def posttrain_config(preset: str, stage: str, split: str) -> ml_collections.ConfigDict:
    """The pretraining preset's model, sequence length and probes, with a task corpus, stage name,
    a short schedule and the log-spaced checkpoints a short stage needs."""
    if preset not in TASKS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(TASKS)}")
    c = pretrain.get_config(preset)
    c.stage = stage
    kind, size = TASKS[preset]
    c.data = ml_collections.ConfigDict(dict(
        name="tasks", task=kind, task_size=size, split=split,  # entropy_jax.data.tasks
        vocab_size=c.data.vocab_size,  # the pretraining vocabulary: tasks use its ids
        # num_val >= the probe set's size: the config check compares them (the probes use the lineage root's data)
        num_train=1_024 if preset == "test" else 20_000, num_val=c.probe_set.num_sequences,
        data_seed=0, data_dir=c.data.data_dir,
        # fact: the pretraining corpus whose facts are asked, and the frequent keys held out
        zipf_exponent=c.data.zipf_exponent, corpus_seed=c.data.data_seed, heldout_keys=256,
    ))
    c.train.steps = STEPS[preset]
    c.train.lr = {"test": 1e-2, "tiny": 3e-4}.get(preset, 3e-3)
    c.train.warmup_steps = 4 if preset == "test" else 20
    c.train.end_lr = c.train.lr / 10
    c.train.weight_decay = 0.0
    c.train.loss = ml_collections.ConfigDict(dict(name="next_token", skip_first=0, chunk=0))
    # The second probe view: the same spectra on the task's held-out prompts (last prompt token), the
    # task's own manifold, beside the lineage root's probe sequences (the Tracing paper's view).
    c.probes.task_last_token = pretrain.representation_probe("last", inputs="task_prompts")
    c.checkpoint.dense_until = 512  # every power of two, then every 100 steps and the last
    c.checkpoint.every = 100
    return c


def get_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    return posttrain_config(preset, "sft", "sft")
