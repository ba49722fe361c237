"""Fine-tuning objectives against direct float64 computations and their defining cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_jax.data.tasks import TaskParams, generate, sequences
from entropy_jax.train.losses import dpo, dpo_objective, make_loss, sequence_logprob, weighted_cross_entropy

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
