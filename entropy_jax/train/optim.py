"""Optimiser and learning-rate schedule: AdamW, linear warmup then cosine decay, global-norm clipping,
and optionally KappaTune (train only the best-conditioned weight matrices)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from entropy_jax.config import TrainConfig


def _typed(train_cfg: TrainConfig | Mapping[str, Any]) -> TrainConfig:
    return train_cfg if isinstance(train_cfg, TrainConfig) else TrainConfig.from_dict(train_cfg)


def make_schedule(train_cfg: TrainConfig | Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine to ``end_lr`` at ``steps``."""
    t = _typed(train_cfg)
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=t.lr, warmup_steps=t.warmup_steps,
                                              decay_steps=max(t.steps, t.warmup_steps + 1), end_value=t.end_lr)


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (embeddings, projections) only, not on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def condition_numbers(params: Any) -> dict[str, float]:
    """``kappa = s_max / s_min`` (float64 SVD) of every weight matrix (2-D parameter), by path."""
    flat = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    out = {}
    for path, leaf in flat:
        if np.ndim(leaf) == 2:
            s = np.linalg.svd(np.asarray(leaf, np.float64), compute_uv=False)
            out[jax.tree_util.keystr(path)] = float(s[0] / s[-1]) if s[-1] > 0 else float("inf")
    return out


def kappatune_mask(params: Any, num_trained: int) -> Any:
    """True for the ``num_trained`` weight matrices of lowest condition number (ties: path order), False
    for every other parameter (KappaTune, Ludwig 2025: well-conditioned matrices adapt with the least
    disturbance to what pretraining stored)."""
    kappas = condition_numbers(params)
    if not 1 <= num_trained <= len(kappas):
        raise ValueError(f"train.kappatune={num_trained}: choose between 1 and the model's {len(kappas)} weight "
                         "matrices (0 trains every parameter)")
    chosen = set(sorted(kappas, key=lambda k: (kappas[k], k))[:num_trained])
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    return jax.tree_util.tree_unflatten(treedef, [jax.tree_util.keystr(p) in chosen for p, _ in flat])


class KappaTuneMask(NamedTuple):
    """The trained (True) / frozen (False) mask, fixed at init (the stage's starting parameters), checkpointed."""

    mask: Any


def kappatune(num_trained: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` (AdamW and its clipping) on the ``num_trained`` lowest-kappa matrices at init only: the
    frozen gradients are zeroed before ``inner`` (so they do not enter the global-norm clip) and the
    frozen updates after it (weight decay), so those parameters stay bit-identical. The mask is
    computed once, from the parameters ``init`` sees. The state is ``(inner state, KappaTuneMask)``,
    the same tree as ``optax.chain(inner, mask)`` has, so checkpoints of either form restore into it.
    """

    def init(params):
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(params)):
            mask = jax.tree.map(lambda _: jnp.zeros((), bool), params)  # shapes only (a restore target)
        else:
            mask = jax.tree.map(jnp.asarray, kappatune_mask(params, num_trained))
        return inner.init(params), KappaTuneMask(mask)

    def update(updates, state, params=None):
        inner_state, mask = state
        keep = lambda tree: jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), tree, mask.mask)
        updates, inner_state = inner.update(keep(updates), inner_state, params)
        return keep(updates), (inner_state, mask)

    return optax.GradientTransformation(init, update)


def make_optimizer(train_cfg: TrainConfig | Mapping[str, Any]) -> optax.GradientTransformation:
    """AdamW (with clipping when ``grad_clip`` > 0), inside KappaTune when ``kappatune`` > 0 (the clip's
    global norm is then over the trained matrices only)."""
    t = _typed(train_cfg)
    tx = optax.adamw(make_schedule(t), b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=decay_mask)
    if t.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), tx)
    return kappatune(t.kappatune, tx) if t.kappatune > 0 else tx
