"""Fine-tuning objectives against direct float64 computations and their defining cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropy_jax.data.tasks import TaskParams, check, generate, sequences
from entropy_jax.models import build_model, model_config
from entropy_jax.train.grpo import answer_logprobs, group_advantages, grpo_objective
from entropy_jax.train.losses import dpo, dpo_objective, sequence_logprob, weighted_cross_entropy
from entropy_jax.train.objective import make_loss
from entropy_jax.train.sampling import sample, sample_recompute

V = 64


def _log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def _task_batch(n=4, seq_len=16):
    d = generate(TaskParams(kind="copy", size=3, vocab_size=V), "sft", n)
    return sequences(d["prompt"], d["answer"], seq_len, V)


def test_sft_gradient_is_zero_on_prompt_and_padding_logits():
    batch = _task_batch()
    logits = jax.random.normal(jax.random.PRNGKey(0), (*batch["targets"].shape, V))
    grad = jax.grad(lambda z: weighted_cross_entropy(z, batch["targets"], batch["weights"])[0])(logits)
    per_position = np.abs(np.asarray(grad)).sum(-1)
    answer = batch["weights"] > 0
    assert answer.sum() == 4 * 3  # copy of 3 tokens: exactly the answer targets carry weight
    assert (per_position[~answer] == 0).all() and (per_position[answer] > 0).all()


def test_sft_loss_equals_float64_answer_cross_entropy():
    batch = _task_batch()
    logits = np.random.default_rng(1).normal(size=(*batch["targets"].shape, V))
    logp = _log_softmax64(logits)
    ce = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    expected = (ce * batch["weights"]).sum() / batch["weights"].sum()
    np.testing.assert_allclose(weighted_cross_entropy(jnp.asarray(logits), batch["targets"], batch["weights"])[0],
                               expected, rtol=1e-5)
    np.testing.assert_allclose(sequence_logprob(jnp.asarray(logits), batch["targets"], batch["weights"]),
                               -(ce * batch["weights"]).sum(-1), rtol=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_dpo_objective_equals_float64_and_is_ln2_at_the_reference(smoothing):
    rng = np.random.default_rng(2)
    pc, pr, rc, rr = (rng.normal(-5, 2, 16) for _ in range(4))
    beta = 0.3
    h = beta * ((pc - rc) - (pr - rr))
    log_sig = lambda x: -np.log1p(np.exp(-x))
    expected = (-(1 - smoothing) * log_sig(h) - smoothing * log_sig(-h)).mean()
    loss, aux = dpo_objective(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)), beta, smoothing)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    np.testing.assert_allclose(aux["reward_margin"], h.mean(), rtol=1e-4, atol=1e-6)
    assert float(aux["reward_accuracy"]) == (h > 0).mean()
    same, aux0 = dpo_objective(*(jnp.asarray(x, jnp.float32) for x in (pc, pr, pc, pr)), beta, smoothing)
    np.testing.assert_allclose(same, np.log(2), rtol=1e-6)
    assert float(aux0["reward_margin"]) == 0.0 and float(aux0["reward_accuracy"]) == 0.0


def test_dpo_without_a_reference_is_refused_in_one_line():
    with pytest.raises(ValueError, match="needs a frozen reference model: start the stage from a checkpoint"):
        make_loss({"name": "dpo", "beta": 0.1, "reference_workdir": ""})
    with pytest.raises(ValueError, match="beta > 0"):
        dpo(beta=0.0, reference_workdir="x")


def test_group_advantage_of_equal_rewards_is_zero_and_normalised_otherwise():
    rewards = jnp.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
    adv = np.asarray(group_advantages(rewards, eps=1e-6, ddof=0))
    assert (adv[:2] == 0).all()
    np.testing.assert_allclose(adv[2], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-6), rtol=1e-6)


def test_group_advantages_use_the_sample_std_by_default():
    rewards = np.array([[1, 0, 0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1]], np.float64)  # G = 8
    mean, std = rewards.mean(1, keepdims=True), rewards.std(1, ddof=1, keepdims=True)  # torch.std: ddof 1
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards, jnp.float32)), (rewards - mean) / (std + 1e-6),
                               rtol=1e-6)


def test_answer_logprobs_are_those_of_the_tempered_softmax():
    rng = np.random.default_rng(4)
    logits, seq = rng.normal(size=(3, 6, V)) * 3, rng.integers(0, V, (3, 6))
    for temperature in (0.7, 1.0, 1.5):
        expected = np.take_along_axis(_log_softmax64(logits / temperature)[:, 2:5], seq[:, 3:, None], -1)[..., 0]
        np.testing.assert_allclose(answer_logprobs(jnp.asarray(logits, jnp.float32), jnp.asarray(seq), 3, temperature),
                                   expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_grpo_gradient_is_reinforce_under_the_sampling_temperature(temperature):
    # One-token copy over 16 tokens: an untrained policy is right often enough for mixed groups.
    d = generate(TaskParams(kind="copy", size=1, vocab_size=16), "rl", 16)
    batch = {"prompts": jnp.asarray(d["prompt"][:8]), "answers": jnp.asarray(d["answer"][:8]),
             "eval_prompts": jnp.asarray(d["prompt"][8:])}
    model = build_model(model_config(dict(d_model=16, num_layers=1, num_heads=2), 16, 8), 0)
    group, rng = 8, jax.random.PRNGKey(7)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_fn = make_loss({"name": "grpo", "group_size": group, "temperature": temperature})
    grad = jax.grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch, rng)[0])(params)
    # Direct: the same draws, rewards by the checker, float64 advantages with torch.std's ddof 1, and
    # -mean over answer tokens of A * grad ln softmax(z / T)[token].
    prompts = jnp.repeat(batch["prompts"], group, axis=0)
    answers = sample(model, prompts, 1, jax.random.split(rng)[0], temperature)
    rewards = np.asarray(check(prompts, answers, 16), np.float64).reshape(-1, group)
    assert 0 < rewards.sum() < rewards.size and (rewards.std(1) > 0).any()
    adv = ((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-6)).reshape(-1)
    seq = jnp.concatenate([prompts, answers], axis=1)

    def reinforce(p):
        logits = nnx.merge(graphdef, p, rest)(seq)[:, -2].astype(jnp.float32) / temperature
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), answers, axis=-1)[:, 0]
        return -jnp.mean(jnp.asarray(adv, jnp.float32) * logp)

    expected = jax.grad(reinforce)(params)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    error = np.linalg.norm(flat(grad) - flat(expected)) / np.linalg.norm(flat(expected))
    assert error < 1e-5, error


def test_grpo_objective_equals_float64():
    rng = np.random.default_rng(3)
    logp, old, ref = (rng.normal(-2, 0.3, (6, 3)) for _ in range(3))
    adv = rng.normal(size=6)
    clip_eps, kl_coef = 0.2, 0.05
    ratio = np.exp(logp - old)
    surrogate = np.minimum(ratio * adv[:, None], np.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv[:, None])
    k3 = np.exp(ref - logp) - (ref - logp) - 1
    loss, aux = grpo_objective(*(jnp.asarray(x, jnp.float32) for x in (logp, old, ref, adv)), clip_eps, kl_coef)
    np.testing.assert_allclose(loss, (-surrogate + kl_coef * k3).mean(), rtol=1e-5)
    np.testing.assert_allclose(aux["kl"], k3.mean(), rtol=1e-4)
    assert float(aux["clip_fraction"]) == pytest.approx((np.abs(ratio - 1) > clip_eps).mean())
    same, aux0 = grpo_objective(*(jnp.asarray(x, jnp.float32) for x in (logp, logp, logp, adv)), clip_eps, kl_coef)
    np.testing.assert_allclose(same, -adv.mean(), rtol=1e-5)  # rho = 1, no KL: minus the mean advantage
    assert float(aux0["kl"]) == 0.0


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_kv_cache_sampling_equals_full_recompute(positions):
    model = build_model(model_config(dict(d_model=16, num_layers=2, num_heads=2, positions=positions), V, 16), 0)
    prompts = jax.random.randint(jax.random.PRNGKey(1), (8, 6), 0, V)
    graphdef, state = nnx.split(model)
    cached = jax.jit(lambda s, p, k, t: sample(nnx.merge(graphdef, s), p, 5, k, t), static_argnums=3)
    for temperature in (0.0, 1.0):
        key = jax.random.PRNGKey(2)
        fast = cached(state, prompts, key, temperature)
        np.testing.assert_array_equal(fast, sample_recompute(model, prompts, 5, key, temperature))
    assert len(np.unique(np.asarray(fast))) > 5  # sampled, not one repeated token
