"""What every architecture family composes: the HF tensors handed out by name with their
bookkeeping (:class:`TensorSource`), the layouts families share (LayerNorm, dense layers, the
embedding and head with padding rows), and Hugging Face's activation names."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np

from entropy_jax.models.hf.safetensors_io import HFImportError
from entropy_jax.models.transformer import ModelConfig

# Hugging Face activation names -> ModelConfig.activation ("gelu" there is the erf form, ours the tanh one).
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu",
               "silu": "silu"}


class TensorSource:
    """The HF tensors by name: hands each out once, collects what is missing or misshapen. Names
    lose ``prefix``; those ending in one of ``buffers`` (stored masks, rotary tables) are dropped."""

    def __init__(self, tensors: Mapping[str, np.ndarray], prefix: str = "", buffers: Iterable[str] = ()):
        ignored = re.compile(r"\.(" + "|".join(map(re.escape, buffers)) + r")$") if buffers else None
        strip = lambda n: n[len(prefix):] if prefix and n.startswith(prefix) else n
        self.tensors = {strip(k): v for k, v in tensors.items() if ignored is None or not ignored.search(k)}
        self.used: set[str] = set()
        self.problems: list[str] = []

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.tensors:
            self.problems.append(f"missing {name} {shape}")
            return np.zeros(shape, np.float32)
        self.used.add(name)
        stored = np.asarray(self.tensors[name])
        if not np.issubdtype(stored.dtype, np.floating):  # never cast an integer or boolean tensor silently
            self.problems.append(f"{name} has dtype {stored.dtype}, a weight must be floating point "
                                 "(float32, float16, bfloat16 or float64)")
            return np.zeros(shape, np.float32)
        a = np.asarray(stored, dtype=np.float32)  # no copy for float32 (or zero-stride) inputs
        if a.shape != tuple(shape):
            self.problems.append(f"{name} has shape {a.shape}, the config implies {tuple(shape)}")
            return np.zeros(shape, np.float32)
        return a

    def check(self, where: str) -> None:
        extra = sorted(set(self.tensors) - self.used)
        problems = self.problems + ([f"unexpected tensors {extra}"] if extra else [])
        if problems:
            raise HFImportError(f"{where}: " + "; ".join(problems) + " (a different or damaged model revision?)")


def activation(name: str, key: str) -> str:
    """ModelConfig.activation of the HF activation ``name`` read from config key ``key``."""
    if name not in ACTIVATIONS:
        raise HFImportError(f"{key}={name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def vocab_padding(vocab_size: int, tokens: int | None) -> int:
    """Embedding rows beyond the tokenizer's ``tokens`` (0 without a tokenizer)."""
    if tokens is None or tokens >= vocab_size:
        return 0
    return vocab_size - tokens


def norm(get: TensorSource, name: str, d: int) -> dict:
    return {"scale": get(f"{name}.weight", (d,)), "bias": get(f"{name}.bias", (d,))}


def dense(kernel: np.ndarray, bias: np.ndarray | None) -> dict:
    return {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}


def head(get: TensorSource, cfg: ModelConfig, name: str) -> np.ndarray | None:
    """The unembedding ``V x D`` of an untied model; None for a tied one (which may still store the
    identical head: taken, so that it is not refused as unexpected)."""
    shape = (cfg.vocab_size, cfg.d_model)
    if not cfg.tie_embeddings:
        return get(name, shape)
    if name in get:
        get(name, shape)
    return None


def vocab(cfg: ModelConfig, embed_VxD: np.ndarray, unembed_VxD: np.ndarray | None) -> dict:
    """Embedding and (untied) unembedding, the rows beyond the tokenizer as padding model state."""
    n = cfg.num_tokens
    out = {"embed": {"embedding": embed_VxD[:n]}}
    if cfg.vocab_padding:
        out["embed_padding"] = embed_VxD[n:]
    if unembed_VxD is not None:
        out["unembed"] = {"kernel": unembed_VxD[:n].T}
        if cfg.vocab_padding:
            out["unembed_padding"] = unembed_VxD[n:].T
    return out
