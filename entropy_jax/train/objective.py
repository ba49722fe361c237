"""The training objective's contract and the registry that ``config.train.loss`` chooses from.

A loss is ``loss_fn(model, batch, rng) -> (loss, aux)``. ``model`` is the merged NNX model (its
non-parameter variables may change during the call; the train step keeps the changes), ``batch``
a dict of arrays sharded over the batch axis, ``rng`` a key already folded with the step.
``loss`` is a float32 scalar to minimise; ``aux`` a flat dict of scalars that the train step adds
to its metrics (and so to ``metrics.jsonl``).

``config.train.loss = dict(name=<registered name>, **kwargs)``; kwargs go to the loss factory.
Each loss module registers its factories with :func:`register_loss`; this module knows none of
them. ``entropy_jax.train`` imports every loss module, so they are all registered by the time
anything here can be imported (the package runs before its submodules).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Batch, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
LossFactory = Callable[..., LossFn]

LOSSES: dict[str, LossFactory] = {}


def register_loss(name: str) -> Callable[[LossFactory], LossFactory]:
    """Decorator: make ``train.loss.name = name`` build the decorated factory (called with the spec's other keys).

    A name registered twice is refused: two losses claiming one config name is a mistake either way.
    """
    def register(factory: LossFactory) -> LossFactory:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice: {LOSSES[name].__module__}.{LOSSES[name].__name__} "
                             f"and {factory.__module__}.{factory.__name__}")
        LOSSES[name] = factory
        return factory

    return register


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
