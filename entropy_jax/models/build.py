"""Building models from configs: the architecture registry, fresh initialisation, abstract skeletons.

A model's variables split three ways (``nnx.split(model, nnx.Param, ...)``): the static graph,
the trainable parameters, and everything else (``model_state``: non-``Param`` variables such as
power-iteration vectors or running statistics). Training carries and checkpoints both states;
probes restore both and read the model through its methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from entropy_jax.models.transformer import ModelConfig, Transformer
from entropy_jax.sharding import replicated

ModelFactory = Callable[..., nnx.Module]  # (ModelConfig, *, rngs) -> module
ARCHITECTURES: dict[str, ModelFactory] = {"transformer": Transformer}


def register_architecture(name: str, factory: ModelFactory) -> None:
    """Make ``ModelConfig(arch=name)`` build ``factory(cfg, rngs=...)`` (a Transformer variant)."""
    ARCHITECTURES[name] = factory


def build_model(mcfg: ModelConfig, seed: int) -> nnx.Module:
    if mcfg.arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={mcfg.arch!r} is not registered; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[mcfg.arch](mcfg, rngs=nnx.Rngs(seed))


def model_config(model: Mapping[str, Any], vocab_size: int, seq_len: int) -> ModelConfig:
    """The frozen model config: the config's ``model`` section plus what the data decides."""
    return ModelConfig.from_dict({**model, "vocab_size": vocab_size, "max_len": seq_len})


def init_model(mcfg: ModelConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Static graph, freshly initialised parameters, and the non-parameter model state."""
    return nnx.split(build_model(mcfg, seed), nnx.Param, ...)


def abstract_model(mcfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Graph, parameter and model-state skeletons (shapes only, replicated over ``mesh``): what
    ``nnx.merge`` and a checkpoint restore need."""
    graphdef, params, model_state = nnx.split(nnx.eval_shape(lambda: build_model(mcfg, 0)), nnx.Param, ...)
    return graphdef, abstract_like(params, replicated(mesh)), abstract_like(model_state, replicated(mesh))


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype skeleton of ``tree`` with every leaf placed by ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
