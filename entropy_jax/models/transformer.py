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

Probes read weights through methods (:meth:`Transformer.query_key_kernels`), never through
module attribute paths.

Switches for published architectures (GPT-2, GPT-NeoX/Pythia; see entropy_jax.models.hf), each
off by default so that a config saved before it existed means what it meant: attention and MLP
biases, the LayerNorm epsilon and exact two-pass variance, a parallel residual, rotary on the
first fraction of each head's dims with a configurable base, exact (erf) GELU, and embedding
rows beyond the tokenizer held as model state rather than parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# "gelu" is the tanh approximation (GPT-2's gelu_new); "gelu_exact" the erf form (GPT-NeoX's gelu).
ACTIVATIONS = {"gelu": jax.nn.gelu, "gelu_exact": functools.partial(jax.nn.gelu, approximate=False),
               "relu": jax.nn.relu, "silu": jax.nn.silu}
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


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

    def __post_init__(self):
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        for name, value, allowed in (
            ("positions", self.positions, POSITIONS),
            ("norm", self.norm, NORMS),
            ("activation", self.activation, tuple(ACTIVATIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"model.{name}={value!r} is not one of {allowed}")
        if self.positions == "rope" and (self.rotary_dims < 2 or self.rotary_dims % 2):
            raise ValueError(f"model.rotary_fraction={self.rotary_fraction} gives {self.rotary_dims} rotary dims of "
                             f"d_head={self.d_head}; it must give an even number >= 2")
        if not 0 <= self.vocab_padding < self.vocab_size:
            raise ValueError(f"model.vocab_padding={self.vocab_padding} must be in [0, vocab_size={self.vocab_size})")

    @property
    def d_head(self) -> int:
        return self.d_model // self.num_heads

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


def rotary(x_BxTxHxK: jax.Array, base: float = 10_000.0, dims: int | None = None) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), rotate-half form, on the first ``dims`` entries
    of the last axis (default all; GPT-NeoX rotates a fraction and passes the rest through)."""
    dims = x_BxTxHxK.shape[-1] if dims is None else dims
    if dims < x_BxTxHxK.shape[-1]:
        rotated = rotary(x_BxTxHxK[..., :dims], base)
        return jnp.concatenate([rotated, x_BxTxHxK[..., dims:]], axis=-1)
    t, k = x_BxTxHxK.shape[1], x_BxTxHxK.shape[-1]
    freqs = base ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2 / k)
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * freqs[None, :]  # T x K/2
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x_BxTxHxK.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def attention_logits(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array) -> jax.Array:
    """Pre-softmax causal logits ``q k^T / sqrt(d_head)``, ``BxHxTxT`` float32, masked entries at the
    most negative finite float32 (softmax gives exact zeros, no NaNs): what the probes read."""
    t, d_head = q_BxTxHxK.shape[1], q_BxTxHxK.shape[-1]
    logits_BxHxTxT = jnp.einsum("bqhk,bshk->bhqs", q_BxTxHxK, k_BxTxHxK).astype(jnp.float32) / jnp.sqrt(d_head)
    causal_TxT = jnp.tril(jnp.ones((t, t), dtype=bool))
    return jnp.where(causal_TxT, logits_BxHxTxT, jnp.finfo(jnp.float32).min)


def explicit_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array) -> jax.Array:
    """Causal softmax attention written out, ``softmax(attention_logits) v``: the reference that
    :func:`fused_attention` is tested against."""
    probs = jax.nn.softmax(attention_logits(q_BxTxHxK, k_BxTxHxK), axis=-1).astype(v_BxTxHxK.dtype)
    return jnp.einsum("bhqs,bshk->bqhk", probs, v_BxTxHxK)


def fused_attention(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxK: jax.Array,
                    query_block: int | None = None) -> jax.Array:
    """Causal ``softmax(q k^T / sqrt(d_head)) v`` through ``jax.nn.dot_product_attention`` (softmax
    in float32); the logits stay inside it.

    On GPUs one causal call, for which JAX selects cuDNN's flash attention (it skips the masked
    half itself). Elsewhere XLA lowers the call to full ``T x T`` matmuls, so the queries go in
    blocks of ``query_block`` positions (default :func:`default_query_block`), each attending
    only to the keys up to its last position: block i of n computes i/n of the square, (n+1)/2n
    of the work in all (62.5 % for n = 4), the same numbers to float tolerance.
    """
    t = q_BxTxHxK.shape[1]
    block = default_query_block(t) if query_block is None else query_block
    if block >= t:
        return jax.nn.dot_product_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, is_causal=True)
    out = []
    for start in range(0, t, block):
        end = min(start + block, t)
        mask_1x1xCxE = (jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :])[None, None]
        out.append(jax.nn.dot_product_attention(q_BxTxHxK[:, start:end], k_BxTxHxK[:, :end], v_BxTxHxK[:, :end],
                                                mask=mask_1x1xCxE))
    return jnp.concatenate(out, axis=1)


def default_query_block(t: int) -> int:
    """``t`` (one call) on GPUs and for short sequences; else a quarter of ``t``, at least 64
    positions (smaller blocks lose more to small-matmul overhead than they save; measured on
    XLA:CPU at the reference shape, T = 256: 4 blocks 1.10x, 2 blocks 1.09x the step rate of one)."""
    if jax.default_backend() == "gpu" or t < 128:
        return t
    return max(64, -(-t // 4))


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention with separate W_Q, W_K, W_V, W_O (probes read W_Q, W_K).

    Projections run on the flattened ``(B*T) x D`` tokens: XLA:CPU lowers the weight gradient of
    a 2-D matmul to one GEMM, but of a ``BxTxD`` one to a much slower two-axis contraction. The
    mixing always runs through :func:`fused_attention`; when the probes ask for the logits,
    :func:`attention_logits` computes them from the same q and k (one more q k^T), so the output
    is the same with or without intermediates, to the last bit.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        dense = lambda i, o: nnx.Linear(i, o, use_bias=cfg.attention_bias, dtype=cfg.dtype, rngs=rngs)
        self.query = dense(cfg.d_model, cfg.d_model)
        self.key = dense(cfg.d_model, cfg.d_model)
        self.value = dense(cfg.d_model, cfg.d_model)
        self.out = dense(cfg.d_model, cfg.d_model)

    def __call__(self, x_BxTxD: jax.Array, return_logits: bool = False) -> tuple[jax.Array, jax.Array | None]:
        """Attention output ``BxTxD`` and, when ``return_logits``, the logits ``BxHxTxT`` (else None)."""
        cfg = self.cfg
        b, t, _ = x_BxTxD.shape
        x_NxD = x_BxTxD.reshape(b * t, cfg.d_model)
        heads = lambda y: y.reshape(b, t, cfg.num_heads, cfg.d_head)
        q, k, v = heads(self.query(x_NxD)), heads(self.key(x_NxD)), heads(self.value(x_NxD))
        if cfg.positions == "rope":
            q, k = (rotary(y, cfg.rotary_base, cfg.rotary_dims) for y in (q, k))
        y_BxTxHxK = fused_attention(q, k, v)
        logits_BxHxTxT = attention_logits(q, k) if return_logits else None
        return self.out(y_BxTxHxK.reshape(b * t, cfg.d_model)).reshape(b, t, cfg.d_model), logits_BxHxTxT


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.activation]
        self.up = nnx.Linear(cfg.d_model, cfg.ff_width, use_bias=cfg.mlp_bias, dtype=cfg.dtype, rngs=rngs)
        self.down = nnx.Linear(cfg.ff_width, cfg.d_model, use_bias=cfg.mlp_bias, dtype=cfg.dtype, rngs=rngs)

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x_NxD = x_BxTxD.reshape(-1, x_BxTxD.shape[-1])
        return self.down(self.act(self.up(x_NxD))).reshape(x_BxTxD.shape)


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)); with ``parallel_residual``
    x + attn(norm1(x)) + mlp(norm2(x)) (GPT-J / GPT-NeoX)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.parallel = cfg.parallel_residual
        self.attn_norm = _norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs)
        self.mlp_norm = _norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x_BxTxD: jax.Array,
                 return_logits: bool = False) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        """New residual, attention logits (None unless ``return_logits``), and the normalised input
        the attention read."""
        normed_BxTxD = self.attn_norm(x_BxTxD)
        attn_out, logits_BxHxTxT = self.attn(normed_BxTxD, return_logits)
        if self.parallel:
            return x_BxTxD + attn_out + self.mlp(self.mlp_norm(x_BxTxD)), logits_BxHxTxT, normed_BxTxD
        x_BxTxD = x_BxTxD + attn_out
        return x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD)), logits_BxHxTxT, normed_BxTxD


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

    def __call__(self, tokens_BxT: jax.Array, return_intermediates: bool = False):
        h_BxTxD, intermediates = self.final_hidden(tokens_BxT, return_intermediates)
        logits_BxTxV = self.logits(h_BxTxD)
        if not return_intermediates:
            return logits_BxTxV
        return logits_BxTxV, intermediates

    def final_hidden(self, tokens_BxT: jax.Array, return_intermediates: bool = False) -> tuple[jax.Array, dict | None]:
        """The hidden state after the final norm, ``h_BxTxD``, and the intermediates (None unless asked);
        ``logits(h)`` completes the forward pass (chunked losses unembed a few tokens at a time)."""
        t = tokens_BxT.shape[1]
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds model.max_len={self.cfg.max_len}")
        h_BxTxD = self._embed(tokens_BxT)
        if self.cfg.positions == "learned":
            h_BxTxD = h_BxTxD + self.pos_embed(jnp.arange(t))[None]
        residual, attention_logits, attention_inputs = [h_BxTxD], [], []
        for block in self.blocks:
            h_BxTxD, logits_BxHxTxT, normed_BxTxD = block(h_BxTxD, return_intermediates)
            residual.append(h_BxTxD)
            attention_logits.append(logits_BxHxTxT)
            attention_inputs.append(normed_BxTxD)
        h_BxTxD = self.final_norm(h_BxTxD)
        residual[-1] = h_BxTxD
        if not return_intermediates:
            return h_BxTxD, None
        return h_BxTxD, {"residual": residual, "attention_logits": attention_logits,
                         "attention_inputs": attention_inputs}

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
        """Per head ``W_Q / sqrt(d_head)`` and ``W_K`` of block ``layer`` (0-based), each H x D x d_head,
        so that head h's logits are ``X W_Q[h] (X W_K[h])^T``; None where no such bilinear form
        exists (rotary positions rotate queries and keys between the two kernels; attention
        biases make the logits affine, not bilinear, in X)."""
        if self.cfg.positions == "rope" or self.cfg.attention_bias:
            return None
        cfg, attn = self.cfg, self.blocks[layer].attn
        split = lambda w: jnp.moveaxis(w.reshape(w.shape[0], cfg.num_heads, cfg.d_head), 1, 0)
        return split(attn.query.kernel[...]) / jnp.sqrt(cfg.d_head), split(attn.key.kernel[...])
