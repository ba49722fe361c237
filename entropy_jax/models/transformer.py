"""A decoder-only transformer in Flax NNX that can show probes what it computes.

``model(tokens)`` returns next-token logits. ``model(tokens, return_intermediates=True)``
also returns, from the same forward pass, what the probes read:

* ``residual``: the L + 1 hidden states ``h_BxTxD`` (embedding output first; the last one
  after the final norm, as in the Tracing paper's probe),
* ``attention_logits``: per layer the pre-softmax logits ``BxHxTxT`` (scaled by
  1/sqrt(d_head)) with the causal mask applied (masked entries hold the dtype's most
  negative finite value, so softmax gives exact zeros and no NaNs),
* ``attention_inputs``: per layer the normalised ``h_BxTxD`` the attention reads (X of the
  logits ``X W_Q (X W_K)^T``).

``logits, cache = model(tokens, cache=cache)`` decodes: the tokens are the next positions of
sequences whose keys and values ``cache`` holds (:meth:`Transformer.init_cache`,
:class:`~entropy_jax.models.attention.KVCache`); the sampler (entropy_jax.train.sampling) feeds
the prompt, then one token per step.

Probes read weights through methods (:meth:`Transformer.query_key_kernels`), never through
module attribute paths.

Switches for published architectures (GPT-2, GPT-NeoX/Pythia, Llama, OLMo-2, Qwen2, Mistral; see
entropy_jax.models.hf.families), each off by default so that a config saved before it existed means
what it meant: attention and MLP biases (W_O's apart, for Qwen2), the LayerNorm epsilon and exact
two-pass variance, a parallel residual, rotary on the first fraction of each head's dims with a
configurable base and Llama's scalings (``linear``, ``llama3``), exact (erf) GELU, embedding rows
beyond the tokenizer held as model state rather than parameters, grouped-query attention
(``num_kv_heads``), an explicit ``head_dim``, the SwiGLU MLP (``activation="swiglu"``:
``down(silu(gate(x)) * up(x))``), QK-norm (RMSNorm over the whole query and key projections,
before the head split and rotary; OLMo-2) and ``norm_placement="sublayer_post"`` (OLMo-2: each
branch ends in its norm, ``x + norm(attn(x))``, no norm before).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropy_jax.models.attention import (
    KVCache,
    LayerCache,
    attend_from,
    attention_logits,
    fused_attention,
    rope_frequencies,
    rotary,
)

# "gelu" is the tanh approximation (GPT-2's gelu_new); "gelu_exact" the erf form (GPT-NeoX's gelu).
ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
               "relu": jax.nn.relu, "silu": jax.nn.silu}
GATED = {"swiglu": jax.nn.silu}  # gated MLPs: down(act(gate(x)) * up(x)) (Shazeer 2020)
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
NORM_PLACEMENTS = ("pre", "sublayer_post")
ROPE_SCALINGS = ("none", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and switches of the transformer (hashable, safe as a static jit argument)."""

    vocab_size: int
    d_model: int = 64
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 0  # 0 means 4 * d_model
    max_len: int = 256
    positions: str = "learned"  # "learned" | "rope"
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    activation: str = "gelu"  # "gelu" | "relu" | "silu"
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    arch: str = "transformer"  # registered architecture (entropy_jax.models.build.ARCHITECTURES)
    # Switches for published architectures; the defaults are what configs without them meant.
    attention_bias: bool = False  # biases on W_Q, W_K, W_V, W_O
    mlp_bias: bool = True  # biases on the MLP's two projections
    norm_eps: float = 1e-6  # epsilon inside the norms (Hugging Face LayerNorms use 1e-5)
    norm_fast_variance: bool = True  # E[x^2] - E[x]^2; False: the two-pass E[(x - E[x])^2] of torch
    parallel_residual: bool = False  # x + attn(norm1(x)) + mlp(norm2(x)), both norms reading x (GPT-NeoX)
    rotary_fraction: float = 1.0  # rope: rotate the first int(d_head * fraction) dims of each head
    rotary_base: float = 10_000.0  # rope: frequencies base^(-2i/rotary_dims)
    vocab_padding: int = 0  # rows beyond the tokenizer: model state, not parameters (out of weight spectra)
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0: num_heads
    head_dim: int = 0  # per-head width; 0: d_model // num_heads
    qk_norm: bool = False  # RMSNorm over the whole q and k projections, before the head split and rotary
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "sublayer_post": x + norm(f(x)) (OLMo-2)
    attention_out_bias: bool = True  # with attention_bias: W_O's bias too (Qwen2: biases on W_Q, W_K, W_V only)
    rope_scaling: str = "none"  # "none" | "linear" (frequencies / factor) | "llama3" (Llama 3.1's banded scaling)
    rope_factor: float = 1.0  # linear, llama3: the scaling factor
    rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
    rope_original_max_len: int = 0  # llama3: the context length of the unscaled pretraining

    def __post_init__(self):
        if not self.head_dim and self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name, value, allowed in (
            ("positions", self.positions, POSITIONS),
            ("norm", self.norm, NORMS),
            ("activation", self.activation, (*ACTIVATIONS, *GATED)),
            ("norm_placement", self.norm_placement, NORM_PLACEMENTS),
            ("rope_scaling", self.rope_scaling, ROPE_SCALINGS),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {allowed}")
        if self.rope_scaling == "llama3" and not (self.rope_original_max_len > 0
                                                  and self.rope_high_freq_factor > self.rope_low_freq_factor > 0):
            raise ValueError("model.rope_scaling='llama3' needs rope_original_max_len > 0 and "
                             "rope_high_freq_factor > rope_low_freq_factor > 0")
        if self.positions == "rope" and (self.rotary_dims < 2 or self.rotary_dims % 2):
            raise ValueError(f"model.rotary_fraction={self.rotary_fraction} gives {self.rotary_dims} rotary dims of "
                             f"d_head={self.d_head}; it must give an even number >= 2")
        if not 0 <= self.vocab_padding < self.vocab_size:
            raise ValueError(f"model.vocab_padding={self.vocab_padding} must be in [0, vocab_size={self.vocab_size})")

    @property
    def d_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: query head h reads key/value head ``h // (num_heads // kv_heads)``."""
        return self.num_kv_heads or self.num_heads

    @property
    def rotary_frequencies(self) -> np.ndarray:
        """The rotary angular frequencies (float32, ``rotary_dims / 2``) with the configured scaling."""
        return rope_frequencies(self.rotary_dims, self.rotary_base, self.rope_scaling, self.rope_factor,
                                self.rope_low_freq_factor, self.rope_high_freq_factor, self.rope_original_max_len)

    @property
    def rotary_dims(self) -> int:
        """Rotated dims per head: ``int(d_head * rotary_fraction)``, as GPT-NeoX computes it."""
        return int(self.d_head * self.rotary_fraction)

    @property
    def num_tokens(self) -> int:
        """Rows of the embedding that are parameters (the tokenizer's size)."""
        return self.vocab_size - self.vocab_padding

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.d_model

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of field ``name`` (what a config saved before the field existed meant)."""
        field = {f.name: f for f in dataclasses.fields(cls)}.get(name)
        return None if field is None else field.default

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Build from a (ConfigDict-like) mapping, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; valid keys: {sorted(known)}")
        return cls(**dict(d))


class PaddingRows(nnx.Variable):
    """Embedding/unembedding rows beyond the tokenizer (published vocabularies are padded, e.g.
    Pythia's 50,304 rows for 50,277 tokens): no token reaches them, so they are model state, not
    parameters, and weight spectra leave them out. Logits still cover all ``vocab_size`` rows."""


def _norm(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    kw = {"epsilon": cfg.norm_eps, "use_fast_variance": cfg.norm_fast_variance, "rngs": rngs}
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.d_model, **kw)
    return nnx.LayerNorm(cfg.d_model, **kw)


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with separate W_Q, W_K, W_V, W_O (probes read W_Q, W_K).

    Projections run on the flattened ``(B*T) x D`` tokens: XLA:CPU lowers the weight gradient of
    a 2-D matmul to one GEMM, but of a ``BxTxD`` one to a much slower two-axis contraction.
    Without a cache the mixing runs through :func:`fused_attention`; when the probes ask for the
    logits, :func:`attention_logits` computes them from the same q and k (one more q k^T), so the
    output is the same with or without intermediates, to the last bit. With a cache (decoding)
    the T new positions start at absolute position ``start``: their keys and values are written
    into the cache and the queries attend over it (:func:`attend_from`).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dense = lambda i, o, bias=cfg.attention_bias: nnx.Linear(i, o, use_bias=bias, dtype=cfg.dtype, rngs=rngs)
        q_width, kv_width = cfg.num_heads * cfg.d_head, cfg.kv_heads * cfg.d_head
        self.query = dense(cfg.d_model, q_width)
        self.key = dense(cfg.d_model, kv_width)
        self.value = dense(cfg.d_model, kv_width)
        self.out = dense(q_width, cfg.d_model, cfg.attention_bias and cfg.attention_out_bias)
        if cfg.qk_norm:
            rms = lambda n: nnx.RMSNorm(n, epsilon=cfg.norm_eps, rngs=rngs)
            self.query_norm, self.key_norm = rms(q_width), rms(kv_width)

    def __call__(self, x_BxTxD: jax.Array, return_logits: bool = False, cache: LayerCache | None = None,
                 start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array | None, LayerCache | None]:
        """Attention output ``BxTxD``, the logits ``BxHxTxT`` when ``return_logits`` (else None), and
        the cache with the new positions written (None without one)."""
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(b * t, cfg.d_model)
        q_NxHK, k_NxGK = self.query(x_NxD), self.key(x_NxD)
        if cfg.qk_norm:
            q_NxHK, k_NxGK = self.query_norm(q_NxHK), self.key_norm(k_NxGK)
        heads = lambda y: y.reshape(b, t, -1, cfg.d_head)
        q, k, v = heads(q_NxHK), heads(k_NxGK), heads(self.value(x_NxD))
        if cfg.positions == "rope":
            positions_T = None if cache is None else start + jnp.arange(t)
            freqs = cfg.rotary_frequencies
            q, k = (rotary(y, cfg.rotary_base, cfg.rotary_dims, positions_T, freqs) for y in (q, k))
        if cache is None:
            y_BxTxHxK = fused_attention(q, k, v)
        else:
            cache = cache.write(k, v, start)
            y_BxTxHxK = attend_from(q, cache.keys, cache.values, start)
        logits_BxHxTxT = attention_logits(q, k) if return_logits else None
        y_NxHK = y_BxTxHxK.reshape(b * t, cfg.num_heads * cfg.d_head)
        return self.out(y_NxHK).reshape(b, t, cfg.d_model), logits_BxHxTxT, cache


class MLP(nnx.Module):
    """``down(act(up(x)))``; gated (``activation="swiglu"``): ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.gated = cfg.activation in GATED
        self.act = GATED[cfg.activation] if self.gated else ACTIVATIONS[cfg.activation]
        dense = lambda i, o: nnx.Linear(i, o, use_bias=cfg.mlp_bias, dtype=cfg.dtype, rngs=rngs)
        if self.gated:
            self.gate = dense(cfg.d_model, cfg.ff_width)
        self.up = dense(cfg.d_model, cfg.ff_width)
        self.down = dense(cfg.ff_width, cfg.d_model)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1])
        hidden_NxF = self.act(self.gate(x_NxD)) * self.up(x_NxD) if self.gated else self.act(self.up(x_NxD))
        return self.down(hidden_NxF).reshape(x_BxTxD.shape)


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); with ``parallel_residual``
    x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J / GPT-NeoX); with ``norm_placement="sublayer_post"``
    x + norm1(attn(x)), then x + norm2(mlp(x)) (OLMo-2: the attention reads the residual itself)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.parallel = cfg.parallel_residual
        self.sublayer_post = cfg.norm_placement == "sublayer_post"
        self.attn_norm = _norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD: jax.Array, return_logits: bool = False, cache: LayerCache | None = None,
                 start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array | None, jax.Array, LayerCache | None]:
        """New residual, attention logits (None unless ``return_logits``), the (normalised) input the
        attention read, and the layer's cache extended by the new positions (None without one)."""
        if self.sublayer_post:
            attn_out, logits_BxHxTxT, cache = self.attn(x_BxTxD, return_logits, cache, start)
            h_BxTxD = x_BxTxD + self.attn_norm(attn_out)
            return h_BxTxD + self.mlp_norm(self.mlp(h_BxTxD)), logits_BxHxTxT, x_BxTxD, cache
        normed_BxTxD = self.attn_norm(x_BxTxD)
        attn_out, logits_BxHxTxT, cache = self.attn(normed_BxTxD, return_logits, cache, start)
        if self.parallel:
            return x_BxTxD + attn_out + self.mlp(self.mlp_norm(x_BxTxD)), logits_BxHxTxT, normed_BxTxD, cache
        x_BxTxD = x_BxTxD + attn_out
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), logits_BxHxTxT, normed_BxTxD, cache


class Transformer(nnx.Module):
    """Decoder-only language model: embed (+ positions) -> L pre-norm blocks -> norm -> unembed."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.num_tokens, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        if cfg.vocab_padding:
            self.embed_padding = PaddingRows(jnp.zeros((cfg.vocab_padding, cfg.d_model)))
        if cfg.positions == "learned":
            self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, dtype=cfg.dtype, rngs=rngs)
        self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.unembed = nnx.Linear(cfg.d_model, cfg.num_tokens, use_bias=False, dtype=cfg.dtype, rngs=rngs)
            if cfg.vocab_padding:
                self.unembed_padding = PaddingRows(jnp.zeros((cfg.d_model, cfg.vocab_padding)))

    def __call__(self, tokens_BxT: jax.Array, return_intermediates: bool = False, cache: KVCache | None = None):
        """Logits ``BxTxV`` (float32), with the intermediates when ``return_intermediates``.

        With ``cache`` (:meth:`init_cache`), the tokens are the next positions ``cache.end ..`` of
        sequences whose earlier keys and values the cache holds: returns the logits and the cache
        extended by the new positions (decoding; no intermediates). Without one, the full forward
        pass of training and the probes."""
        if cache is not None:
            if return_intermediates:
                raise ValueError("intermediates come from the full forward pass, not from a cached one")
            h_BxTxD, _, cache = self._hidden(tokens_BxT, False, cache)
            return self.logits(h_BxTxD), cache
        h_BxTxD, intermediates = self.final_hidden(tokens_BxT, return_intermediates)
        logits_BxTxV = self.logits(h_BxTxD)
        if not return_intermediates:
            return logits_BxTxV
        return logits_BxTxV, intermediates

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty key/value cache for ``batch`` sequences of up to ``length`` positions."""
        cfg = self.cfg
        if length > cfg.max_len:
            raise ValueError(f"a cache of {length} positions exceeds model.max_len={cfg.max_len}")
        return KVCache.empty(cfg.num_layers, batch, length, cfg.kv_heads, cfg.d_head, jnp.dtype(cfg.dtype))

    def final_hidden(self, tokens_BxT: jax.Array, return_intermediates: bool = False) -> tuple[jax.Array, dict | None]:
        """The hidden state after the final norm, ``h_BxTxD``, and the intermediates (None unless asked);
        ``logits(h)`` completes the forward pass (chunked losses unembed a few tokens at a time)."""
        h_BxTxD, intermediates, _ = self._hidden(tokens_BxT, return_intermediates, None)
        return h_BxTxD, intermediates

    def _hidden(self, tokens_BxT: jax.Array, return_intermediates: bool,
                cache: KVCache | None) -> tuple[jax.Array, dict | None, KVCache | None]:
        t = tokens_BxT.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds model.max_len={self.cfg.max_len}")
        start = 0 if cache is None else cache.end
        h_BxTxD = self._embed(tokens_BxT)
        if self.cfg.positions == "learned":
            h_BxTxD = h_BxTxD + self.pos_embed(jnp.arange(t) if cache is None else start + jnp.arange(t))[None]
        residual, attention_logits, attention_inputs, layers = [h_BxTxD], [], [], []
        for i, block in enumerate(self.blocks):
            h_BxTxD, logits_BxHxTxT, normed_BxTxD, layer = block(
                h_BxTxD, return_intermediates, None if cache is None else cache.layers[i], start)
            residual.append(h_BxTxD)
            attention_logits.append(logits_BxHxTxT)
            attention_inputs.append(normed_BxTxD)
            layers.append(layer)
        h_BxTxD = self.final_norm(h_BxTxD)
        residual[-1] = h_BxTxD
        cache = None if cache is None else KVCache(tuple(layers), cache.end + t)
        if not return_intermediates:
            return h_BxTxD, None, cache
        return h_BxTxD, {"residual": residual, "attention_logits": attention_logits,
                         "attention_inputs": attention_inputs}, cache

    def logits(self, h_xD: jax.Array) -> jax.Array:
        """Float32 next-token logits ``...xV`` of final hidden states ``...xD`` (any leading shape)."""
        h_NxD = h_xD.reshape(-1, self.cfg.d_model)
        return self._unembed(h_NxD).reshape(*h_xD.shape[:-1], -1).astype(jnp.float32)

    def _embed(self, tokens_BxT: jax.Array) -> jax.Array:
        if not self.cfg.vocab_padding:
            return self.embed(tokens_BxT)
        table = jnp.concatenate([self.embed.embedding[...], self.embed_padding[...]])
        return jnp.take(table, tokens_BxT, axis=0).astype(self.cfg.dtype)

    def _unembed(self, h_NxD: jax.Array) -> jax.Array:
        logits_NxV = self.embed.attend(h_NxD) if self.cfg.tie_embeddings else self.unembed(h_NxD)
        if not self.cfg.vocab_padding:
            return logits_NxV
        pad_DxP = self.embed_padding[...].T if self.cfg.tie_embeddings else self.unembed_padding[...]
        return jnp.concatenate([logits_NxV, h_NxD @ pad_DxP.astype(h_NxD.dtype)], axis=-1)

    def query_key_kernels(self, layer: int) -> tuple[jax.Array, jax.Array] | None:
        """Per query head ``W_Q / sqrt(d_head)`` and its key head's ``W_K`` of block ``layer`` (0-based),
        each H x D x d_head (with grouped-query attention a key head's kernel repeats for every query
        head that shares it), so that head h's logits are ``X W_Q[h] (X W_K[h])^T``; None where no
        such bilinear form exists (rotary positions rotate queries and keys between the two kernels;
        attention biases make the logits affine, not bilinear, in X; QK-norm divides them by
        per-token norms)."""
        if self.cfg.positions == "rope" or self.cfg.attention_bias or self.cfg.qk_norm:
            return None
        cfg, attn = self.cfg, self.blocks[layer].attn
        split = lambda w: jnp.moveaxis(w.reshape(w.shape[0], -1, cfg.d_head), 1, 0)
        w_k_HxDxK = jnp.repeat(split(attn.key.kernel[...]), cfg.num_heads // cfg.kv_heads, axis=0)
        return split(attn.query.kernel[...]) / jnp.sqrt(cfg.d_head), w_k_HxDxK
