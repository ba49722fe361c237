"""Hugging Face architecture families, one module each, registered by config.json's ``model_type``.

A family module holds its config.json mapping (the ModelConfig switches it sets), its tensor
names and layouts, and ends with ``register_family(Family(...))``; :mod:`.common` holds what
families share, :mod:`.registry` the registry. Adding a family: its module, and its import below.
"""

# Each import registers its family (the module ends with register_family).
import entropy_jax.models.hf.families.gpt2  # noqa: F401
import entropy_jax.models.hf.families.gpt_neox  # noqa: F401
import entropy_jax.models.hf.families.llama  # noqa: F401
import entropy_jax.models.hf.families.mistral  # noqa: F401
import entropy_jax.models.hf.families.olmo2  # noqa: F401
import entropy_jax.models.hf.families.qwen2  # noqa: F401
from entropy_jax.models.hf.families.common import TensorSource
from entropy_jax.models.hf.families.registry import FAMILIES, Family, family, register_family

__all__ = ["FAMILIES", "Family", "TensorSource", "family", "register_family"]
