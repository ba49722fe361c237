"""The supervised and preference losses (the contract and the registry: :mod:`entropy_jax.train.objective`).

Fine-tuning stages: SFT is ``next_token`` on task batches (their ``weights`` keep only answer
tokens); ``dpo`` compares chosen and rejected answers against a frozen reference (the stage's
init checkpoint, :mod:`entropy_jax.train.reference`); ``grpo`` (:mod:`entropy_jax.train.grpo`)
samples answers and rewards them with the task checker.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from entropy_jax.train.objective import Batch, LossFn, register_loss
from entropy_jax.train.reference import load_reference_params, reference_model


def weighted_cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array,
                           weights_BxT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy (nats/token, float32) over tokens of nonzero weight, and the weight sum.

    ``sum_t w_t CE_t / sum_t w_t``; ``weights`` None means every token counts once.
    """
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
    if weights_BxT is None:
        return ce_BxT.mean(), jnp.asarray(ce_BxT.size, jnp.float32)
    w = weights_BxT.astype(jnp.float32)
    total = w.sum()
    return (ce_BxT * w).sum() / jnp.maximum(total, 1.0), total


def chunked_cross_entropy(h_BxTxD: jax.Array, unembed: Callable[[jax.Array], jax.Array], targets_BxT: jax.Array,
                          weights_BxT: jax.Array, chunk: int) -> jax.Array:
    """``sum_t w_t CE_t`` (nats, float32) with the logits made ``chunk`` positions at a time.

    ``unembed`` maps hidden states ``BxCxD`` to float32 logits ``BxCxV``. A ``lax.scan`` over the
    time axis in chunks of ``chunk`` positions (padded with weight 0) computes each chunk's logits,
    cross-entropy and weighted sum; ``jax.checkpoint`` around the chunk makes the backward pass
    recompute the chunk's logits instead of storing them. So float32 logits exist for
    ``B x chunk`` tokens at a time, never for the whole ``BxTxV`` batch (the idea of Cut
    Cross-Entropy, Wijmans et al. 2024, at chunk rather than kernel granularity). The batch axis
    stays whole, so its sharding over the mesh is untouched.
    """
    b, t, d = h_BxTxD.shape
    pad = -t % chunk
    if pad:
        h_BxTxD = jnp.pad(h_BxTxD, ((0, 0), (0, pad), (0, 0)))
        targets_BxT, weights_BxT = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets_BxT, weights_BxT))
    n = (t + pad) // chunk
    h_NxBxCxD = jnp.moveaxis(h_BxTxD.reshape(b, n, chunk, d), 1, 0)
    targets_NxBxC, weights_NxBxC = (jnp.moveaxis(x.reshape(b, n, chunk), 1, 0) for x in (targets_BxT, weights_BxT))

    @jax.checkpoint
    def chunk_loss(h_BxCxD, targets_BxC, weights_BxC):
        ce_BxC = optax.softmax_cross_entropy_with_integer_labels(unembed(h_BxCxD), targets_BxC)
        return (ce_BxC * weights_BxC).sum()

    def body(total, xs):
        return total + chunk_loss(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h_NxBxCxD, targets_NxBxC, weights_NxBxC))
    return total


@register_loss("next_token")
def next_token(skip_first: int = 0, chunk: int = 0) -> LossFn:
    """Next-token cross-entropy, optionally weighted per token.

    Weights: ``batch["weights"]`` when the data provides them (e.g. answer tokens only), times
    0 on the first ``skip_first`` positions of every sequence (predictions from a short context).
    ``chunk`` > 0 unembeds ``chunk`` positions at a time (:func:`chunked_cross_entropy`; for large
    vocabularies, where the batch's float32 logits dominate memory); the model must offer
    ``final_hidden`` and ``logits`` (:class:`entropy_jax.models.Transformer` does). Same loss and
    gradient as ``chunk=0`` to float tolerance.
    aux: ``loss_tokens``, the number of tokens that counted in this global batch.
    """
    if chunk < 0:
        raise ValueError(f"train.loss.chunk={chunk} must be >= 0 (0: the whole batch's logits at once)")

    def loss_fn(model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        weights = batch.get("weights")
        if skip_first:
            t = batch["targets"].shape[1]
            keep_T = (jnp.arange(t) >= skip_first).astype(jnp.float32)
            weights = keep_T[None, :] if weights is None else weights * keep_T[None, :]
            weights = jnp.broadcast_to(weights, batch["targets"].shape)
        if not chunk:
            loss, tokens = weighted_cross_entropy(model(batch["inputs"]), batch["targets"], weights)
            return loss, {"loss_tokens": tokens}
        if not hasattr(model, "final_hidden"):
            raise ValueError(f"train.loss.chunk={chunk} needs a model with final_hidden() and logits() "
                             f"({type(model).__name__} has none); set train.loss.chunk=0")
        w = jnp.ones(batch["targets"].shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
        h_BxTxD, _ = model.final_hidden(batch["inputs"])
        total = w.sum()
        loss = chunked_cross_entropy(h_BxTxD, model.logits, batch["targets"], w, chunk) / jnp.maximum(total, 1.0)
        return loss, {"loss_tokens": total}

    return loss_fn


def sequence_logprob(logits_BxTxV: jax.Array, targets_BxT: jax.Array, weights_BxT: jax.Array) -> jax.Array:
    """``sum_t w_t ln p(target_t)`` per sequence (nats, float32 ``[B]``): the log-probability of the
    weighted tokens (an answer) given everything before them."""
    logp_BxT = -optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
    return (logp_BxT * weights_BxT.astype(jnp.float32)).sum(axis=-1)


def dpo_objective(policy_chosen: jax.Array, policy_rejected: jax.Array, ref_chosen: jax.Array,
                  ref_rejected: jax.Array, beta: float, label_smoothing: float = 0.0) -> tuple[jax.Array, dict]:
    """Direct preference optimisation (Rafailov et al. 2023), per pair from sequence log-probabilities.

    Implicit rewards ``r = beta (ln pi(y|x) - ln pi_ref(y|x))``; with ``h = r_chosen - r_rejected``
    the loss is ``-(1 - eps) ln sigmoid(h) - eps ln sigmoid(-h)`` (``eps`` = ``label_smoothing``,
    the conservative DPO of Mitchell 2023), averaged over pairs (nats). aux: ``reward_margin``
    (mean h), ``reward_accuracy`` (share of pairs with h > 0), ``reward_chosen``, ``reward_rejected``.
    """
    r_chosen, r_rejected = beta * (policy_chosen - ref_chosen), beta * (policy_rejected - ref_rejected)
    h = r_chosen - r_rejected
    loss = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(h) - label_smoothing * jax.nn.log_sigmoid(-h)
    aux = {"reward_margin": h.mean(), "reward_accuracy": (h > 0).astype(jnp.float32).mean(),
           "reward_chosen": r_chosen.mean(), "reward_rejected": r_rejected.mean()}
    return loss.mean(), aux


@register_loss("dpo")
def dpo(beta: float = 0.1, label_smoothing: float = 0.0, reference_workdir: str = "",
        reference_step: int = -1) -> LossFn:
    """DPO on task batches: chosen answer in ``inputs``/``targets``/``weights``, rejected in
    ``rejected_*``; the reference is checkpoint ``reference_step`` of ``reference_workdir``."""
    if not (beta > 0 and 0.0 <= label_smoothing < 0.5):
        raise ValueError(f"train.loss: dpo needs beta > 0 and 0 <= label_smoothing < 0.5, got beta={beta}, "
                         f"label_smoothing={label_smoothing}")
    ref_params = load_reference_params("dpo", reference_workdir, reference_step)

    def loss_fn(model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        inputs = jnp.concatenate([batch["inputs"], batch["rejected_inputs"]])  # one forward for both answers
        targets = jnp.concatenate([batch["targets"], batch["rejected_targets"]])
        weights = jnp.concatenate([batch["weights"], batch["rejected_weights"]])
        policy = sequence_logprob(model(inputs), targets, weights)
        ref = sequence_logprob(reference_model(model, ref_params)(inputs), targets, weights)
        b = batch["inputs"].shape[0]
        loss, aux = dpo_objective(policy[:b], policy[b:], ref[:b], ref[b:], beta, label_smoothing)
        return loss, {**aux, "loss_tokens": batch["weights"].sum() + batch["rejected_weights"].sum()}

    return loss_fn
