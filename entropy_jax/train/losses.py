"""Training objectives: ``loss_fn(model, batch, rng) -> (loss, aux)``, chosen by ``config.train.loss``.

``model`` is the merged NNX model (its non-parameter variables may change during the call; the
train step keeps the changes), ``batch`` a dict of arrays sharded over the batch axis, ``rng`` a
key already folded with the step. ``loss`` is a float32 scalar to minimise; ``aux`` a flat dict of
scalars that the train step adds to its metrics (and so to ``metrics.jsonl``).

``config.train.loss = dict(name=<key of LOSSES>, **kwargs)``; kwargs go to the loss factory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


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


def next_token(skip_first: int = 0) -> LossFn:
    """Next-token cross-entropy, optionally weighted per token.

    Weights: ``batch["weights"]`` when the data provides them (e.g. answer tokens only), times
    0 on the first ``skip_first`` positions of every sequence (predictions from a short context).
    aux: ``loss_tokens``, the number of tokens that counted in this global batch.
    """

    def loss_fn(model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        weights = batch.get("weights")
        if skip_first:
            t = batch["targets"].shape[1]
            keep_T = (jnp.arange(t) >= skip_first).astype(jnp.float32)
            weights = keep_T[None, :] if weights is None else weights * keep_T[None, :]
            weights = jnp.broadcast_to(weights, batch["targets"].shape)
        loss, tokens = weighted_cross_entropy(model(batch["inputs"]), batch["targets"], weights)
        return loss, {"loss_tokens": tokens}

    return loss_fn


LOSSES: dict[str, Callable[..., LossFn]] = {"next_token": next_token}


def make_loss(spec: Mapping[str, Any] | None) -> LossFn:
    """The loss named by ``spec["name"]`` built with the remaining keys (None: plain next-token)."""
    spec = dict(spec or {"name": "next_token"})
    name = spec.pop("name", "next_token")
    if name not in LOSSES:
        raise ValueError(f"train.loss.name={name!r} is not a known loss; choose one of {sorted(LOSSES)}")
    try:
        return LOSSES[name](**spec)
    except TypeError as e:
        raise ValueError(f"train.loss={dict(name=name, **spec)} has arguments {name!r} does not take ({e})") from e
