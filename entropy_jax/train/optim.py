"""Optimiser and learning-rate schedule: AdamW, linear warmup then cosine decay, global-norm clipping."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax


def make_schedule(train_cfg: Mapping[str, Any]) -> optax.Schedule:
    """Linear warmup from 0 to ``lr`` over ``warmup_steps``, cosine to ``end_lr`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train_cfg["lr"],
        warmup_steps=train_cfg["warmup_steps"],
        decay_steps=max(train_cfg["steps"], train_cfg["warmup_steps"] + 1),
        end_value=train_cfg["end_lr"],
    )


def decay_mask(params: Any) -> Any:
    """Weight decay on matrices (embeddings, projections) only, not on biases and norm scales."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(train_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
    adamw = optax.adamw(
        make_schedule(train_cfg),
        b1=train_cfg["b1"],
        b2=train_cfg["b2"],
        weight_decay=train_cfg["weight_decay"],
        mask=decay_mask,
    )
    if train_cfg["grad_clip"] > 0:
        return optax.chain(optax.clip_by_global_norm(train_cfg["grad_clip"]), adamw)
    return adamw
