"""A loss that no module of the package defines: ``coef / 2 * ||params||^2``, the squared L2 norm
of the trainable parameters (weight decay as the whole objective).

Importing this module registers it as ``train.loss.name = "param_l2"``: one decorator, nothing
else, is what adding a loss takes. Its value is a function of the parameters alone, so a test can
recompute it from a checkpoint; its aux entries carry the norm and the size of the batch it saw.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from entropy_jax.train.objective import Batch, LossFn, register_loss


@register_loss("param_l2")
def param_l2(coef: float = 1.0) -> LossFn:
    """``coef / 2 * sum_i theta_i^2`` over every ``nnx.Param`` (float32). aux: ``param_sq_norm``
    (the sum of squares) and ``batch_tokens`` (the number of targets in the global batch)."""

    def loss_fn(model, batch: Batch, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        del rng
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        sq_norm = sum(jnp.sum(jnp.square(p.astype(jnp.float32))) for p in leaves)
        return 0.5 * coef * sq_norm, {"param_sq_norm": sq_norm,
                                      "batch_tokens": jnp.asarray(batch["targets"].size, jnp.float32)}

    return loss_fn
