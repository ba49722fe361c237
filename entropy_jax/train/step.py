"""The train state and the jitted train step.

Style: ``jax.jit`` over the pure state (``nnx.split``/``nnx.merge``), returning the new state,
so the state is an ordinary pytree that Orbax saves and the step can donate.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from entropy_jax.models import ModelConfig, Transformer

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: number of updates applied
    params: nnx.State
    opt_state: optax.OptState


def init_model(model_cfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's static graph and its freshly initialised parameters."""
    return nnx.split(Transformer(model_cfg, rngs=nnx.Rngs(seed)), nnx.Param)


def init_state(params: nnx.State, tx: optax.GradientTransformation) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def cross_entropy(logits_BxTxV: jax.Array, targets_BxT: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy in nats/token (float32)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
    return losses.mean()


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, batch: Batch) -> jax.Array:
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(batch["inputs"]), batch["targets"])


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedule: optax.Schedule
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """Build the jitted step once per run; it compiles once per batch shape and donates the state."""

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        loss, grads = jax.value_and_grad(loss_fn)(state.params, graphdef, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=0)
