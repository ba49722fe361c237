"""The registry of Hugging Face architecture families, keyed by config.json's ``model_type``.

A family is what the importer knows about one architecture: how its config.json maps to a
:class:`~entropy_jax.models.ModelConfig` (which forward switches it sets) and how its tensor
names and layouts map to the NNX parameter tree. The forward pass itself is the shared
:class:`~entropy_jax.models.Transformer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from entropy_jax.models.hf.families.common import TensorSource
from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture family.

    ``config(hf, tokens)``: the ModelConfig computing what transformers computes for ``hf`` (a
    parsed config.json; ``tokens`` the tokenizer's size or None), refusing by name, as an
    HFImportError, every option it does not implement. ``weights(get, cfg)``: the parameter tree
    as a pure dict (``nnx.to_pure_dict`` layout, padding rows under ``embed_padding`` /
    ``unembed_padding``), every tensor taken through ``get``. ``prefix``: stripped from tensor
    names; ``buffers``: name suffixes of stored non-weights (masks, rotary tables) that are
    ignored. ``tiny_config``: a small config.json of the family, its switches at their
    defaults, of which the tests build random-weight models (so a registered family is tested
    without further code).
    """

    model_type: str
    config: Callable[[dict[str, Any], int | None], ModelConfig]
    weights: Callable[[TensorSource, ModelConfig], dict]
    tiny_config: Mapping[str, Any]
    prefix: str = ""
    buffers: tuple[str, ...] = ()


FAMILIES: dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Make ``model_type = family.model_type`` importable."""
    FAMILIES[family.model_type] = family
    return family


def family(model_type: Any) -> Family:
    """The registered family of ``model_type``; an HFImportError naming the registered ones otherwise."""
    if model_type not in FAMILIES:
        raise HFImportError(f"model_type={model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
