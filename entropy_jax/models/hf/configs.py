"""Hugging Face ``config.json`` -> :class:`~entropy_jax.models.ModelConfig`, through the family that
``model_type`` names (:mod:`entropy_jax.models.hf.families`). Every option that would change the
computation and is not implemented is refused by name, never ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from entropy_jax.models.hf.families import family
from entropy_jax.models.hf.safetensors_io import HFImportError, read_json_object
from entropy_jax.models.transformer import ModelConfig


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.exists():
        raise HFImportError(f"{folder} has no config.json; point --hf_dir at a model revision folder "
                            "(config.json next to the safetensors files)")
    return read_json_object(path)


def tokenizer_size(folder: Path) -> int | None:
    """Tokens of ``tokenizer.json`` (vocabulary plus added tokens: max id + 1); None without one."""
    path = Path(folder) / "tokenizer.json"
    if not path.exists():
        return None
    tok = read_json_object(path)
    try:
        vocab = tok.get("model", {}).get("vocab", {})
        ids = set(vocab.values()) if isinstance(vocab, dict) else set(range(len(vocab)))
        ids |= {t["id"] for t in tok.get("added_tokens", [])}
        if not all(type(i) is int and i >= 0 for i in ids):
            raise TypeError("token ids must be non-negative integers")
    except (AttributeError, KeyError, TypeError) as e:
        raise HFImportError(f"{path} is not a tokenizer.json ({type(e).__name__}: {e}); download it again") from None
    return max(ids) + 1 if ids else None


def model_config(hf: dict[str, Any], tokens: int | None = None) -> ModelConfig:
    """The ModelConfig computing what transformers computes for ``hf`` (a parsed config.json);
    ``tokens``: the tokenizer's size, whose excess embedding rows become ``vocab_padding``."""
    kind = hf.get("model_type")
    fam = family(kind)
    try:
        return fam.config(hf, tokens)
    except KeyError as e:
        raise HFImportError(f"config.json of a {kind} model lacks {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, HFImportError):
            raise
        raise HFImportError(f"config.json gives an invalid model ({type(e).__name__}: {e})") from None
