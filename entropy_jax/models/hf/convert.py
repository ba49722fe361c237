"""Hugging Face tensor names and layouts -> the NNX parameter tree of :class:`~entropy_jax.models.Transformer`,
through the family that ``model_type`` names (:mod:`entropy_jax.models.hf.families`: each family's
module documents its layout). Any missing, extra or misshapen tensor is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from entropy_jax.models.hf.families import TensorSource, family
from entropy_jax.models.transformer import ModelConfig

STATE_KEYS = ("embed_padding", "unembed_padding")  # model state (entropy_jax.models.transformer.PaddingRows)


def convert(model_type: str, cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
            where: str = "the weights") -> tuple[dict, dict]:
    """(parameters, model state) as pure dicts in the NNX tree's layout (``nnx.to_pure_dict``),
    float32. Raises HFImportError naming every missing, extra or misshapen tensor."""
    fam = family(model_type)
    get = TensorSource(tensors, fam.prefix, fam.buffers)
    tree = fam.weights(get, cfg)
    get.check(where)
    state = {k: tree.pop(k) for k in STATE_KEYS if k in tree}
    return tree, state
