"""GRPO (Shao et al. 2024, DeepSeekMath): RL with verifiable rewards inside the ordinary train step.

Per prompt of an ``rl`` task batch the loss samples ``group_size`` answers from the current policy
(jitted, key/value cache, :mod:`entropy_jax.train.sampling`; no gradient through sampling), rewards
each 1 when the task checker (:func:`entropy_jax.data.tasks.check`) accepts it, else 0, and
normalises within the group: ``A = (r - mean_group r) / (std_group r + eps)``, the standard
deviation with ``ddof`` 1 by default (the sample std of tunix and TRL's ``torch.std``; ``ddof=0``
gives the population std, sqrt(G / (G - 1)) times larger advantages). The objective per
answer token is the clipped surrogate ``-min(rho A, clip(rho, 1 - e, 1 + e) A)`` with
``rho = pi / pi_old`` plus ``kl_coef`` times the k3 estimate of KL(pi || pi_ref),
``exp(ln pi_ref - ln pi) - (ln pi_ref - ln pi) - 1`` (Schulman 2020), averaged over tokens. One
update per batch, so ``pi_old`` is the policy itself (``rho = 1``, its gradient the policy
gradient). pi, pi_old and pi_ref are all ``softmax(logits / temperature)``, the distribution
the answers were sampled from (as tunix and TRL score them). aux: ``reward_mean``, ``reward_std``
(mean within-group std, same ``ddof``), ``pass_at_1`` (greedy,
on the batch's held-out ``eval_prompts``), ``kl`` (mean k3), ``clip_fraction``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entropy_jax.data.tasks import check
from entropy_jax.train.objective import Batch, LossFn, register_loss
from entropy_jax.train.reference import load_reference_params, reference_model
from entropy_jax.train.sampling import sample


def group_advantages(rewards_BxG: jax.Array, eps: float = 1e-6, ddof: int = 1) -> jax.Array:
    """``(r - mean) / (std + eps)`` within each group (row); std with ``ddof`` (1: the sample std,
    as tunix and TRL). Equal rewards give 0."""
    mean = rewards_BxG.mean(axis=1, keepdims=True)
    return (rewards_BxG - mean) / (rewards_BxG.std(axis=1, keepdims=True, ddof=ddof) + eps)


def grpo_objective(logp_NxA: jax.Array, old_logp_NxA: jax.Array, ref_logp_NxA: jax.Array, advantages_N: jax.Array,
                   clip_eps: float, kl_coef: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The clipped surrogate plus ``kl_coef`` x k3 KL, averaged over answer tokens (see the module docstring)."""
    ratio = jnp.exp(logp_NxA - old_logp_NxA)
    adv = advantages_N[:, None]
    surrogate = jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv)
    log_ref_ratio = ref_logp_NxA - logp_NxA
    k3 = jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0
    loss = (-surrogate + kl_coef * k3).mean()
    clipped = (jnp.abs(ratio - 1.0) > clip_eps).astype(jnp.float32).mean()
    return loss, {"kl": k3.mean(), "clip_fraction": clipped}


def answer_logprobs(logits_NxLxV: jax.Array, seq_NxL: jax.Array, answer_len: int,
                    temperature: float = 1.0) -> jax.Array:
    """``ln p(answer token | everything before it)`` under ``softmax(logits / temperature)`` for the last
    ``answer_len`` tokens: N x A, float32."""
    pred = logits_NxLxV[:, -answer_len - 1:-1].astype(jnp.float32) / temperature
    return -optax.softmax_cross_entropy_with_integer_labels(pred, seq_NxL[:, -answer_len:])


@register_loss("grpo")
def grpo(group_size: int = 8, temperature: float = 1.0, clip_eps: float = 0.2, kl_coef: float = 0.0,
         eps: float = 1e-6, reference_workdir: str = "", reference_step: int = -1, ddof: int = 1) -> LossFn:
    """GRPO on ``rl`` task batches (``prompts``, ``answers`` for the answer length, ``eval_prompts``).
    A reference (the stage's init checkpoint) is needed only when ``kl_coef`` > 0. ``ddof`` (0 or 1,
    default 1) is that of the group standard deviation."""
    if group_size < 2 or temperature <= 0 or not 0 < clip_eps < 1 or kl_coef < 0 or ddof not in (0, 1):
        raise ValueError(f"train.loss: grpo needs group_size >= 2, temperature > 0, 0 < clip_eps < 1, "
                         f"kl_coef >= 0 and ddof 0 or 1; got {group_size}, {temperature}, {clip_eps}, {kl_coef}, "
                         f"{ddof}")
    ref_params = load_reference_params("grpo", reference_workdir, reference_step) if kl_coef > 0 else None

    def loss_fn(model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        vocab, answer_len = model.cfg.vocab_size, batch["answers"].shape[1]
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        frozen = nnx.merge(graphdef, jax.lax.stop_gradient(params), model_state, copy=True)
        prompts = jnp.repeat(batch["prompts"], group_size, axis=0)  # group g of prompt b: row b * G + g
        sample_key, eval_key = jax.random.split(rng)
        answers = jax.lax.stop_gradient(sample(frozen, prompts, answer_len, sample_key, temperature))
        facts = batch.get("facts")  # the fact task's table, one row per prompt (entropy_jax.data.task_builder)
        group_facts = None if facts is None else jnp.repeat(facts, group_size, axis=0)
        rewards = check(prompts, answers, vocab, group_facts).astype(jnp.float32)
        advantages = group_advantages(rewards.reshape(-1, group_size), eps, ddof).reshape(-1)
        seq = jnp.concatenate([prompts, answers], axis=1)
        logp = answer_logprobs(model(seq), seq, answer_len, temperature)
        old = jax.lax.stop_gradient(logp)
        ref = old if ref_params is None else jax.lax.stop_gradient(
            answer_logprobs(reference_model(model, ref_params)(seq), seq, answer_len, temperature))
        loss, aux = grpo_objective(logp, old, ref, advantages, clip_eps, kl_coef)
        greedy = sample(frozen, batch["eval_prompts"], answer_len, eval_key, 0.0)
        return loss, {**aux, "reward_mean": rewards.mean(),
                      "reward_std": rewards.reshape(-1, group_size).std(axis=1, ddof=ddof).mean(),
                      "pass_at_1": check(batch["eval_prompts"], greedy, vocab, facts).astype(jnp.float32).mean(),
                      "loss_tokens": jnp.asarray(logp.size, jnp.float32)}

    return loss_fn
