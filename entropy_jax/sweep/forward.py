"""Sharded forward passes over the fixed probe set, reduced on device to what the evaluators read.

Per example (so padding can be dropped and batches concatenated exactly):
  * ``last``/``mean``: residual stream at the last token / mean over tokens, ``(L+1) x D`` each
    (index 0 = embedding output, index L = after the final norm),
  * ``predictive_entropy`` / ``predictive_entropy_last``: next-token entropy, mean over
    positions and at the last position (nats),
  * ``task_prompts/last`` / ``task_prompts/mean``: the same over the stage's held-out task prompts
    (a pass of its own, over prompts only: ``last`` is the last prompt token, where the answer is
    read off),
  * ``attention/<metric>`` (a second pass, over the first sequences only): per layer and head,
    the mean over query rows of the measured attention entropy, its normalisation by ln T_i, and
    the Theorem 3.1 bound under three choices of s (:data:`ATTENTION_METRICS`).

Each evaluator declares what it reads (:class:`Reads`); :func:`probe_forward` runs the union of
the declarations of the evaluators with rows to compute, and skips a pass none of them reads.
The model is read only through its outputs and methods (``return_intermediates``,
``query_key_kernels``), never through module attribute paths.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from entropy_jax.probes.attention import (
    attention_entropy,
    attention_entropy_lower_bound,
    causal_mask,
    predictive_entropy,
)
from entropy_jax.probes.matrix_norms import NORM_METHODS, bilinear_form_norm, spectral_norm, spectral_norm_upper_bound
from entropy_jax.sharding import data_sharding

# Per layer and head, means over query rows (nats): measured entropy, entropy / ln T_i, and the
# Theorem 3.1 bound with s = each row's norm, the logit matrix's spectral norm, ||W_K W_Q^T|| ||X X^T||.
BOUNDS = ("row", "logits", "weights")
ATTENTION_METRICS = ("attention_entropy", "attention_entropy_normalised",
                     *(f"attention_entropy_bound_{b}" for b in BOUNDS))
# How ||Z||_2 and ||X||_2 in the bounds were taken (NORM_METHODS): "certified" upper bounds
# (default, products only) or "exact" eigvalsh. Per example: 1.0 = exact, 0.0 = certified.
EXACT_NORMS_KEY = "attention/exact_norms"
TASK_PROMPTS = "task_prompts"  # prefix of the task-prompt pass's outputs


@dataclasses.dataclass(frozen=True)
class Reads:
    """What one evaluator reads from the forward passes; ``a | b`` is what both read.

    ``probe_set``: the pass over every probe sequence (``last``, ``mean``, ``predictive_entropy``,
    ``predictive_entropy_last``).
    ``task_prompts``: the pass over the stage's held-out task prompts (``task_prompts/last``, ``task_prompts/mean``).
    ``attention_examples``: the attention pass over the first this many sequences (0: none), its
    spectral norms taken by ``attention_norm`` (:data:`NORM_METHODS`; one pass takes one method).
    """

    probe_set: bool = False
    task_prompts: bool = False
    attention_examples: int = 0
    attention_norm: str | None = None

    def __or__(self, other: Reads) -> Reads:
        norms = {self.attention_norm, other.attention_norm} - {None}
        if len(norms) > 1:
            raise ValueError(f"attention norms {sorted(norms)} asked for together: one attention pass takes one")
        return Reads(self.probe_set or other.probe_set, self.task_prompts or other.task_prompts,
                     max(self.attention_examples, other.attention_examples), next(iter(norms), None))


def union(reads: Iterable[Reads]) -> Reads:
    """What a set of evaluators reads together (nothing for none)."""
    return functools.reduce(Reads.__or__, reads, Reads())


def _spectral_norms(mats: jax.Array, norm: str) -> jax.Array:
    """``||A||_2`` of every matrix in ``mats`` (..., m, n) by ``norm`` (see ``spectral_norm``).

    ``exact`` runs under ``lax.map``, one matrix at a time, never ``vmap``: a batched LAPACK
    call inside a program sharded over several CPU devices deadlocks XLA:CPU (jaxlib's kernel
    spreads the batch over the intra-op thread pool whose workers are all busy running the
    devices' programs, then waits for itself). One matrix per call runs inline. ``certified``
    is products only and vmaps.
    """
    flat = mats.reshape(-1, *mats.shape[-2:])
    if norm == "exact":
        out = jax.lax.map(lambda a: spectral_norm(a, "exact"), flat)
    else:
        out = jax.vmap(spectral_norm_upper_bound)(flat)
    return out.reshape(mats.shape[:-2])


def _head_bounds(z_BxHxTxT: jax.Array, x_BxTxD: jax.Array, kernels: tuple | None, norm: str) -> jax.Array:
    """Row-mean Theorem 3.1 bounds per example and head for the three choices of s: B x H x 3.

    s per causal row i (T_i = i + 1 keys): ``row`` = ``||z_i||_2``; ``logits`` = ``||Z||_2`` of
    the head's masked, zero-filled logits; ``weights`` = ``||W_K W_Q^T||_2 ||X||_2^2``, the
    first taken once per head (exact, :func:`bilinear_form_norm`), the second once per example
    (NaN without a bilinear form: rotary positions or attention biases). ``norm`` chooses how ``||Z||_2`` and
    ``||X||_2`` are taken: ``exact`` or ``certified`` (upper bounds: lower, still valid bounds).
    """
    t = z_BxHxTxT.shape[-1]
    visible = causal_mask(t, t)
    num_keys_T = jnp.arange(1, t + 1)
    z_vis = jnp.where(visible, z_BxHxTxT, 0.0)
    mean_bound = lambda s: jnp.mean(attention_entropy_lower_bound(s, num_keys_T), axis=-1)
    bound_row = mean_bound(jnp.linalg.norm(z_vis, axis=-1))
    bound_logits = mean_bound(_spectral_norms(z_vis, norm)[..., None])
    if kernels is None:  # no bilinear form W_Q W_K^T (rotary positions, attention biases): no weights bound
        bound_weights = jnp.full_like(bound_logits, jnp.nan)
    else:
        w_norm_H = jax.lax.map(lambda wqk: bilinear_form_norm(*wqk), kernels)  # LAPACK: one head at a time
        x_norm_B = _spectral_norms(x_BxTxD.astype(jnp.float32), norm)
        bound_weights = mean_bound((x_norm_B[:, None] ** 2 * w_norm_H[None, :])[..., None])
    return jnp.stack([bound_row, bound_logits, bound_weights], axis=-1)


def _attention_stats(model, inter: dict, norm: str = "certified") -> dict[str, jax.Array]:
    """Per example, layer and head: row-mean entropy and bounds, each B x L x H (see
    :func:`_head_bounds`); ``attention/exact_norms`` per example: 1.0 where ``norm="exact"``
    gave the spectral norms, 0.0 where certified upper bounds did."""
    if norm not in NORM_METHODS:
        raise ValueError(f"attention norm must be one of {NORM_METHODS}, got {norm!r}")
    per_layer = []
    for layer, (logits_BxHxTxT, x_BxTxD) in enumerate(zip(inter["attention_logits"], inter["attention_inputs"],
                                                           strict=True)):
        ent = jax.vmap(lambda z: attention_entropy(z[None], causal=True))(logits_BxHxTxT)
        bnd_BxHx3 = _head_bounds(logits_BxHxTxT, x_BxTxD, model.query_key_kernels(layer), norm)
        per_layer.append(jnp.concatenate(
            [ent["head"][..., None], ent["head_normalised"][..., None], bnd_BxHx3], axis=-1))
    stacked = jnp.stack(per_layer, axis=1)  # B x L x H x 5
    out = {f"attention/{k}": stacked[..., i] for i, k in enumerate(ATTENTION_METRICS)}
    out[EXACT_NORMS_KEY] = jnp.full(stacked.shape[:1], float(norm == "exact"), jnp.float32)
    return out


@functools.partial(jax.jit, static_argnums=0)
def _representations(graphdef: nnx.GraphDef, state: tuple, tokens_BxT: jax.Array) -> dict[str, jax.Array]:
    logits_BxTxV, inter = nnx.merge(graphdef, *state)(tokens_BxT, return_intermediates=True)
    h_BxLxTxD = jnp.stack(inter["residual"], axis=1)
    pred_BxT = predictive_entropy(logits_BxTxV)
    return {
        "last": h_BxLxTxD[:, :, -1].astype(jnp.float32),
        "mean": h_BxLxTxD.mean(axis=2, dtype=jnp.float32),
        "predictive_entropy": pred_BxT.mean(-1),
        "predictive_entropy_last": pred_BxT[:, -1],
    }


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention(graphdef: nnx.GraphDef, state: tuple, tokens_BxT: jax.Array, norm: str) -> dict[str, jax.Array]:
    model = nnx.merge(graphdef, *state)
    _, inter = model(tokens_BxT, return_intermediates=True)
    return _attention_stats(model, inter, norm)


def to_host(tree):
    """Every leaf as a full numpy array on every process (an all-gather where a leaf spans other
    processes' devices; a plain copy on one process)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    return multihost_utils.process_allgather(tree, tiled=True)


def _batched(fn, graphdef, state, tokens: np.ndarray, mesh: jax.sharding.Mesh, batch_size: int) -> dict:
    """``fn`` over ``tokens`` in global batches sharded over ``mesh``; per-example host arrays.

    The last batch is padded by repeating rows (one compiled shape) and the padding is dropped.
    """
    n_dev = mesh.devices.size
    batch = max(n_dev, min(batch_size, len(tokens)) // n_dev * n_dev)
    pieces = []
    for start in range(0, len(tokens), batch):
        chunk = tokens[start:start + batch]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
        out = fn(graphdef, state, jax.device_put(padded, data_sharding(mesh)))
        pieces.append({k: v[: len(chunk)] for k, v in to_host(out).items()})
    return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def probe_forward(
    graphdef: nnx.GraphDef, params: nnx.State, model_state: nnx.State, tokens: np.ndarray,
    mesh: jax.sharding.Mesh, batch_size: int, reads: Reads = Reads(probe_set=True),
    task_tokens: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The passes ``reads`` asks for over ``tokens`` (M x T): representations and predictive
    entropies of all sequences (``reads.probe_set``); representations of the held-out task prompts
    ``task_tokens`` (N x P, ``reads.task_prompts``); attention statistics of the first
    ``reads.attention_examples`` only, the bounds' spectral norms taken as ``reads.attention_norm``
    says: "certified" upper bounds (matrix products, O(T^2) per head and example, the default) or
    "exact" eigenvalues (O(T^3), one LAPACK call at a time)."""
    state = (params, model_state)
    out = _batched(_representations, graphdef, state, tokens, mesh, batch_size) if reads.probe_set else {}
    if reads.task_prompts:
        if task_tokens is None:
            raise ValueError("a task-prompt pass was asked for without task prompts")
        prompts = _batched(_representations, graphdef, state, task_tokens, mesh, batch_size)
        out |= {f"{TASK_PROMPTS}/{k}": prompts[k] for k in ("last", "mean")}
    if reads.attention_examples:
        attention = functools.partial(_attention, norm=reads.attention_norm or "certified")
        out |= _batched(attention, graphdef, state, tokens[:reads.attention_examples], mesh, batch_size)
    return out
