"""Held-out evaluation of a fine-tuning stage on its task, at every checkpoint (columns of metrics.jsonl).

What a stage teaches, measured on prompts it never trains on: the first :data:`EVAL_PROMPTS`
examples of the task's ``validation`` split (and of ``validation_ood`` where the task has an
out-of-distribution split). The stored answers are the checker's expected answers (every example
is verified by :func:`entropy_jax.data.tasks.check` when the data is generated), so exact match
with them is the checker's verdict.

* ``eval_accuracy`` (``eval_accuracy_ood``): greedy (temperature 0) exact match, every stage;
* ``eval_reward_accuracy`` (DPO): the share of held-out (chosen, rejected) pairs whose implicit
  reward margin ``(ln pi(c) - ln pi_ref(c)) - (ln pi(r) - ln pi_ref(r))`` is positive (Rafailov et
  al. 2023; beta > 0 scales the margin, not its sign), against the loss's reference;
* ``pass_at_k`` and ``sample_entropy`` (GRPO): the share of held-out prompts with at least one
  correct answer among k = ``group_size`` answers sampled at the loss's temperature T, and the
  mean per-token entropy (nats) of ``softmax(z / T)`` at the sampled answer tokens (the
  generation diversity the Tracing paper trades against reward).

Each metric is one jitted call per checkpoint (compiled once per stage); samples draw from
``fold_in(key(seed), step)``, so a resumed run writes the same values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropy_jax.data.task_builder import stack_records
from entropy_jax.data.tasks import sequences
from entropy_jax.train.losses import sequence_logprob
from entropy_jax.train.reference import load_reference_params
from entropy_jax.train.sampling import sample

EVAL_PROMPTS = 256
METRICS = ("eval_accuracy", "eval_accuracy_ood", "eval_reward_accuracy", "pass_at_k", "sample_entropy")
HELD_OUT = {"": "validation", "_ood": "validation_ood"}  # metric suffix -> corpus split attribute

Examples = dict[str, np.ndarray]  # prompt [N, P], answer [N, A], rejected [N, A]


def held_out(source: Any, num: int = EVAL_PROMPTS) -> Examples:
    """The first ``num`` examples of a task split's random-access source, stacked (int32)."""
    records = source.__getitems__(list(range(min(num, len(source)))))
    return {k: stack_records(records, k) for k in ("prompt", "answer", "rejected")}


def greedy_accuracy(model: nnx.Module, prompts_NxP: jax.Array, answers_NxA: jax.Array) -> jax.Array:
    """Share of prompts whose greedy answer equals the expected one (float32 scalar)."""
    greedy = sample(model, prompts_NxP, answers_NxA.shape[1], jax.random.key(0), 0.0)
    return jnp.all(greedy == answers_NxA, axis=1).astype(jnp.float32).mean()


def reward_accuracy(model: nnx.Module, reference: nnx.Module, chosen: Mapping[str, jax.Array],
                    rejected: Mapping[str, jax.Array]) -> jax.Array:
    """Share of pairs with a positive implicit-reward margin (``chosen``/``rejected``: next-token rows
    of :func:`entropy_jax.data.tasks.sequences`, weights on the answer)."""
    def logp(m: nnx.Module, rows: Mapping[str, jax.Array]) -> jax.Array:
        return sequence_logprob(m(rows["inputs"]), rows["targets"], rows["weights"])

    margin = (logp(model, chosen) - logp(reference, chosen)) - (logp(model, rejected) - logp(reference, rejected))
    return (margin > 0).astype(jnp.float32).mean()


def pass_at_k(model: nnx.Module, prompts_NxP: jax.Array, answers_NxA: jax.Array, k: int, temperature: float,
              key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(share of prompts with a correct answer among ``k`` samples at ``temperature``, the mean entropy
    in nats of ``softmax(z / temperature)`` over the sampled answer tokens)."""
    n, a = answers_NxA.shape
    prompts = jnp.repeat(prompts_NxP, k, axis=0)  # sample g of prompt i: row i * k + g
    drawn = sample(model, prompts, a, key, temperature)
    correct = jnp.all(drawn == jnp.repeat(answers_NxA, k, axis=0), axis=1).reshape(n, k)
    seq = jnp.concatenate([prompts, drawn], axis=1)
    z = model(seq)[:, -a - 1:-1] / temperature  # the logits each answer token was drawn from
    entropy = -(jax.nn.softmax(z, axis=-1) * jax.nn.log_softmax(z, axis=-1)).sum(axis=-1)
    return jnp.any(correct, axis=1).astype(jnp.float32).mean(), entropy.mean()


class TaskEvaluation:
    """``evaluate(params, model_state, step) -> {metric: float}`` for one stage: its held-out sets and
    its loss's reference (DPO) or sampling settings (GRPO) fixed at construction."""

    def __init__(self, graphdef: nnx.GraphDef, corpus: Any, loss: Mapping[str, Any], seed: int):
        self.sets = {suffix: held_out(getattr(corpus, split)) for suffix, split in HELD_OUT.items()
                     if getattr(corpus, split, None) is not None}
        self.key, name = jax.random.key(seed), loss.get("name")
        merge = lambda params, state: nnx.merge(graphdef, params, state, copy=True)
        self._accuracy = jax.jit(lambda p, s, x, y: greedy_accuracy(merge(p, s), x, y))
        self._reward = self._pass = None
        if name == "dpo":
            self.reference = load_reference_params("dpo", loss["reference_workdir"], loss["reference_step"])
            val = self.sets[""]
            rows = [sequences(val["prompt"], val[k], corpus.seq_len, corpus.vocab_size) for k in ("answer", "rejected")]
            self.pairs = tuple(rows)
            self._reward = jax.jit(lambda p, s, r, c, w: reward_accuracy(merge(p, s), merge(r, s), c, w))
        if name == "grpo":
            k, t = int(loss.get("group_size", 8)), float(loss.get("temperature", 1.0))
            self._pass = jax.jit(lambda p, s, x, y, key: pass_at_k(merge(p, s), x, y, k, t, key))

    def __call__(self, params: nnx.State, model_state: nnx.State, step: int) -> dict[str, float]:
        out = {f"eval_accuracy{suffix}": float(self._accuracy(params, model_state, ex["prompt"], ex["answer"]))
               for suffix, ex in self.sets.items()}
        if self._reward is not None:
            out["eval_reward_accuracy"] = float(self._reward(params, model_state, self.reference, *self.pairs))
        if self._pass is not None:
            val = self.sets[""]
            passed, entropy = self._pass(params, model_state, val["prompt"], val["answer"],
                                         jax.random.fold_in(self.key, step))
            out |= {"pass_at_k": float(passed), "sample_entropy": float(entropy)}
        return out


def task_evaluation(graphdef: nnx.GraphDef, corpus: Any, loss: Mapping[str, Any],
                    seed: int) -> Callable[[nnx.State, nnx.State, int], dict[str, float]] | None:
    """The held-out evaluation of a stage that trains on a task corpus; None for other corpora."""
    if getattr(corpus, "task", None) is None:
        return None
    return TaskEvaluation(graphdef, corpus, loss, seed)
