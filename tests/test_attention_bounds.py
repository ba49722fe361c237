"""Certified spectral-norm upper bounds for the Theorem 3.1 attention bounds.

Upper-bound-ness against float64 numpy norms on random and adversarial matrices; each piece of
the bound on its own; the sweep's certified bounds below the exact ones and the measured entropy
on a trained run; the exact option equal to the per-head reference computation.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax._src.lax import lax as lax_internal

from entropy_jax import data, probes
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.models import ModelConfig, abstract_model
from entropy_jax.probes import matrix_norms as norms
from entropy_jax.sharding import data_sharding, make_mesh
from entropy_jax.sweep.evaluators import Attention, Context, ModelInfo
from entropy_jax.sweep.forward import ATTENTION_METRICS, EXACT_NORMS_KEY, _attention_stats


def _matrices(t: int = 48) -> dict[str, np.ndarray]:
    """Families where cheap norm bounds are known to go wrong or be loose, float32 values."""
    rng = np.random.default_rng(0)
    g = lambda *shape: rng.standard_normal(shape)
    lower = np.tril(np.ones((t, t), bool))
    alt = (-1.0) ** np.arange(t)
    orth = lambda: np.linalg.qr(g(t, t))[0]
    fams = {
        "gaussian": g(12, t, t),
        "rank1": np.stack([np.outer(g(t), g(t)) for _ in range(12)]),
        "sign_alternating": np.stack([np.outer(alt, g(t) + 2) for _ in range(6)] + [np.outer(alt, alt)] * 2),
        "causal_lowrank": np.stack([np.where(lower, g(t, 6) @ g(6, t) + c, 0.0) for c in (0, 3, -3, 10)]),
        "causal_ones": np.stack([np.where(lower, 1.0, 0.0), np.where(lower, alt[None, :], 0.0)]),
        "equal_singular_values": np.stack([orth() for _ in range(4)]),  # no gap at all
        "decaying": np.stack([orth() @ np.diag(np.arange(1, t + 1) ** -p) @ orth().T for p in (0.5, 1.0, 2.0)]),
        "two_equal_top": np.stack([orth() @ np.diag(np.r_[5.0, 5.0, np.full(t - 2, 0.1)]) @ orth().T]),
        "heavy_tailed": rng.standard_cauchy((6, t, t)),
        "tiny_and_huge": np.stack([g(t, t) * 1e-30, g(t, t) * 1e30]),
        "single_entry": np.stack([np.eye(t)[:, :1] @ np.eye(t)[:1] * 7.0]),
    }
    return {k: v.astype(np.float32) for k, v in fams.items()}


def _exact(mats: np.ndarray) -> np.ndarray:
    return np.array([np.linalg.norm(m.astype(np.float64), 2) for m in mats])


def test_certified_norm_is_never_below_the_exact_norm() -> None:
    fams = _matrices()
    mats = np.concatenate(list(fams.values()))
    bound = np.asarray(jax.jit(jax.vmap(norms.spectral_norm_upper_bound))(mats), np.float64)
    exact = _exact(mats)
    family = np.repeat(list(fams), [len(v) for v in fams.values()])
    assert not set(family[~(bound >= exact)]), (bound / exact)[~(bound >= exact)]
    frobenius = np.linalg.norm(mats.astype(np.float64), axis=(1, 2))
    assert not set(family[bound > frobenius * (1 + 1e-3)])  # never worse than the plainest bound


def test_certified_norm_is_tight_when_the_rank_is_low() -> None:
    rng = np.random.default_rng(1)
    low_rank = [rng.standard_normal((64, r)) @ rng.standard_normal((r, 48)) for r in (1, 3, 8)]
    mats = np.stack([*low_rank, np.zeros((64, 48))])
    bound = np.asarray(jax.jit(jax.vmap(norms.spectral_norm_upper_bound))(mats.astype(np.float32)))
    np.testing.assert_allclose(bound[:3] / _exact(mats[:3]), 1.0, atol=2e-3)  # rank <= 8: only the margin is left
    assert bound[3] == 0.0
    tall = rng.standard_normal((2, 96, 24)).astype(np.float32)  # the small-Gram route (a T x D input)
    for mats in (tall, np.swapaxes(tall, 1, 2)):
        ratio = np.asarray(jax.jit(jax.vmap(norms.spectral_norm_upper_bound))(mats)) / _exact(mats)
        assert (ratio >= 1).all() and (ratio < 1.003).all()


@pytest.mark.parametrize("m, n, k", [(17, 29, 5), (31, 7, 9)])
def test_each_piece_bounds_the_norm(m: int, n: int, k: int) -> None:
    rng = np.random.default_rng(2)
    trials = 16
    a = rng.standard_normal((trials, m, n)) * rng.uniform(0.1, 10, (trials, 1, 1)) + rng.uniform(-3, 3, (trials, 1, 1))
    # Any Q, far from orthonormal and with a zero column: the 1 + 3 delta term keeps it valid.
    q = rng.standard_normal((trials, m, k)) * rng.uniform(0.01, 3, (trials, 1, 1))
    q[:, :, 0] = 0.0
    s = rng.standard_normal((trials, k, k))
    s = s + np.swapaxes(s, 1, 2)  # indefinite: the bound covers the largest |eigenvalue|
    pieces = lambda a, q, s: (norms._entrywise_norm_bounds_squared(a), norms._collatz_wielandt_squared(a, 3),
                              norms._projection_bound_squared(a, q, 6), norms._max_eigenvalue_upper_bound(s, 10))
    with jax.enable_x64(True):
        entrywise, cw, projection, eig = map(np.asarray, jax.jit(jax.vmap(pieces))(a, q, s))
    exact2 = _exact(a) ** 2 * (1 - 1e-12)
    assert (entrywise >= exact2).all() and (cw >= exact2).all() and (projection >= exact2).all()
    top = np.abs(np.linalg.eigvalsh(s)).max(axis=1)
    assert (eig >= top * (1 - 1e-12)).all() and (eig <= top * k ** (1 / 2048) * (1 + 1e-12)).all()


def test_bilinear_form_norm_matches_numpy() -> None:
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        for d, dh in [(16, 4), (8, 8)]:
            w_q, w_k = rng.standard_normal((d, dh)), rng.standard_normal((d, dh))
            w_k[:, -1] = 0.0  # rank-deficient W_K: zero eigenvalues under the square root
            np.testing.assert_allclose(float(norms.bilinear_form_norm(w_q, w_k)), np.linalg.norm(w_k @ w_q.T, 2),
                                       rtol=1e-10)


def _round_mantissa(x: jax.Array, bits: int) -> jax.Array:
    """float32 ``x`` rounded to nearest (ties to even) with ``bits`` mantissa bits, as TF32 (10) and bfloat16 (7) do."""
    if x.dtype != jnp.float32:
        return x
    u = jax.lax.bitcast_convert_type(x, jnp.uint32)
    drop = 23 - bits
    u = (u + jnp.uint32((1 << (drop - 1)) - 1) + ((u >> drop) & 1)) & jnp.uint32(0xFFFFFFFF ^ ((1 << drop) - 1))
    return jax.lax.bitcast_convert_type(u, jnp.float32)


@contextlib.contextmanager
def _accelerator_matmuls(bits: int):
    """Every ``dot_general`` not asking for ``Precision.HIGHEST`` rounds its float32 operands to ``bits``
    mantissa bits, then multiplies exactly: JAX's default matmul on recent GPUs (TF32) and TPUs (bfloat16)."""
    original = lax_internal.dot_general

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
        highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
        if lax_internal.canonicalize_precision(precision) != highest:
            lhs, rhs = _round_mantissa(jnp.asarray(lhs), bits), _round_mantissa(jnp.asarray(rhs), bits)
        return original(lhs, rhs, dimension_numbers, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=preferred_element_type, **kwargs)

    jax.clear_caches()  # traces made outside would skip the emulation, and those made inside must not leak
    lax_internal.dot_general = dot_general
    try:
        yield
    finally:
        lax_internal.dot_general = original
        jax.clear_caches()


def test_round_mantissa_is_round_to_nearest() -> None:
    x = jnp.asarray(np.float32([1 + 2**-11 + 2**-13, 1 + 2**-11, 1 + 3 * 2**-11, 1 + 2**-12, -(1 + 2**-10 + 2**-11)]))
    np.testing.assert_array_equal(_round_mantissa(x, 10), np.float32([1 + 2**-10, 1, 1 + 2**-9, 1, -(1 + 2**-9)]))
    np.testing.assert_array_equal(_round_mantissa(x, 7), np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)))


def _layernorm_like(rng: np.random.Generator, n: int, t: int, d: int) -> np.ndarray:
    """T x D rows normalised to mean 0, variance 1, then a gain and bias: the X of ``bound_weights``."""
    x = rng.standard_normal((n, t, d)) * rng.uniform(0.2, 3, (n, 1, d)) + 2 * rng.standard_normal((n, 1, d))
    x = (x - x.mean(-1, keepdims=True)) / x.std(-1, keepdims=True)
    return x * rng.uniform(0.5, 1.5, (n, 1, d)) + 0.1 * rng.standard_normal((n, 1, d))


@pytest.mark.parametrize("bits", [10, 7])  # TF32, bfloat16
def test_norms_hold_at_accelerator_matmul_precision(bits: int) -> None:
    rng = np.random.default_rng(11)
    lower = np.tril(np.ones((48, 48), bool))
    fams = {
        "layernorm_64x32": _layernorm_like(rng, 40, 64, 32),
        "offset_64x24": rng.standard_normal((40, 64, 24)) + 1.0,
        "causal_48": np.where(lower, rng.standard_normal((40, 48, 48)) + 3.0, 0.0),
        "low_rank_48": np.einsum("nik,nkj->nij", rng.standard_normal((40, 48, 3)), rng.standard_normal((40, 3, 48)))
        + 1e-3 * rng.standard_normal((40, 48, 48)),
    }
    below, worst, exact_error = {}, {}, {}
    with _accelerator_matmuls(bits):
        for name, mats in fams.items():
            mats = mats.astype(np.float32)
            exact = _exact(mats)
            ratio = np.asarray(jax.jit(jax.vmap(norms.spectral_norm_upper_bound))(mats), np.float64) / exact
            below[name], worst[name] = int((ratio < 1).sum()), ratio.min()
            exact_error[name] = np.abs(np.asarray(jax.jit(jax.vmap(norms.spectral_norm))(mats)) / exact - 1).max()
        w_q, w_k = rng.standard_normal((2, 64, 16)).astype(np.float32)
        bilinear = float(norms.bilinear_form_norm(w_q, w_k))
    assert not any(below.values()), (below, worst)
    assert max(exact_error.values()) < 2e-6, exact_error
    np.testing.assert_allclose(bilinear, np.linalg.norm(w_k.astype(np.float64) @ w_q.T.astype(np.float64), 2),
                               rtol=2e-6)


@pytest.mark.parametrize("scale", [1e-41, 1e-39, 1e-37])
def test_certified_norm_covers_subnormals_flushed_to_zero(scale: float) -> None:
    rng = np.random.default_rng(12)
    mats = (rng.standard_normal((3, 48, 40)) * scale).astype(np.float32)
    assert (np.abs(mats) < np.finfo(np.float32).tiny).any()  # subnormal entries, which XLA flushes
    exact = _exact(mats)
    bound = np.asarray(jax.jit(jax.vmap(norms.spectral_norm_upper_bound))(mats), np.float64)
    assert (bound >= exact).all(), bound / exact
    assert float(norms.spectral_norm_upper_bound(np.zeros((48, 40), np.float32))) == 0.0


@pytest.mark.parametrize("scale", [1e19, 1e-19, 1e-30])
def test_exact_norms_neither_overflow_nor_underflow(scale: float) -> None:
    rng = np.random.default_rng(13)
    a = (rng.standard_normal((3, 40, 24)) * scale).astype(np.float32)
    np.testing.assert_allclose(jax.vmap(norms.spectral_norm)(a), _exact(a), rtol=2e-6)
    w_q, w_k = (rng.standard_normal((2, 40, 8)) * np.clip(scale, 1e-15, 1e15)).astype(np.float32)  # the norm fits
    np.testing.assert_allclose(norms.bilinear_form_norm(w_q, w_k),
                               np.linalg.norm(w_k.astype(np.float64) @ w_q.T.astype(np.float64), 2), rtol=2e-6)


def test_library_certified_bounds_sit_between_zero_and_the_exact_ones() -> None:
    rng = np.random.default_rng(4)
    t, d, dh = 24, 12, 4
    scale = np.array([0.1, 1.0, 10.0])[:, None, None]
    x = rng.standard_normal((3, t, d))
    w_q, w_k = rng.standard_normal((3, d, dh)) * scale / 3, rng.standard_normal((3, d, dh)) / 3
    logits = np.einsum("bqd,bkd->bqk", x @ w_q, x @ w_k)
    bounds = lambda norm: jax.tree.map(np.asarray, jax.jit(jax.vmap(functools.partial(
        probes.attention_entropy_bounds, causal=True, norm=norm)))(logits, w_q=w_q, w_k=w_k, x=x))
    exact, cert = bounds("exact"), bounds("certified")
    for name in ("logits", "weights"):
        assert (cert[f"s_{name}"] >= exact[f"s_{name}"]).all(), name
        assert (cert[f"bound_{name}"] <= exact[f"bound_{name}"] + 1e-6).all(), name
    assert (cert["bound_logits"] <= cert["measured"]).all()
    with pytest.raises(ValueError, match="norm method must be one of"):
        probes.attention_entropy_bounds(logits[0], norm="svd")


@functools.partial(jax.jit, static_argnums=(0, 3))
def _stats(graphdef, state, tokens, norm):
    model = nnx.merge(graphdef, *state)
    _, inter = model(tokens, return_intermediates=True)
    return _attention_stats(model, inter, norm), inter


@pytest.fixture(scope="module")
def trained(tiny_run):
    """The test preset's first and last checkpoints and 32 probe sequences, sharded over 4 devices."""
    cfg, workdir, _ = tiny_run
    ckpts = Checkpoints(workdir, read_only=True)
    steps = ckpts.all_steps()
    mcfg = ModelConfig(**ckpts.read_meta(steps[-1])["model_config"])
    mesh = make_mesh()
    graphdef, params, model_state = abstract_model(mcfg, mesh)
    states = {}
    for step in (steps[0], steps[-1]):
        r = ckpts.restore(step, arrays={"params": params, "model_state": model_state})
        states[step] = (r["params"], r["model_state"])
    ckpts.close()
    corpus = data.load_corpus(cfg.data, cfg.train.seq_len)
    tokens = jax.device_put(data.probe_set(corpus, cfg.probe_set.num_sequences)[0][:32], data_sharding(mesh))
    return mcfg, graphdef, states, tokens


def test_sweep_bounds_certified_below_exact_below_measured(trained) -> None:
    mcfg, graphdef, states, tokens = trained
    for state in states.values():
        exact, inter = jax.device_get(_stats(graphdef, state, tokens, "exact"))
        cert, _ = jax.device_get(_stats(graphdef, state, tokens, "certified"))
        assert (exact[EXACT_NORMS_KEY] == 1).all() and (cert[EXACT_NORMS_KEY] == 0).all()
        measured = exact["attention/attention_entropy"]
        np.testing.assert_array_equal(cert["attention/attention_entropy"], measured)
        np.testing.assert_array_equal(cert["attention/attention_entropy_bound_row"],
                                      exact["attention/attention_entropy_bound_row"])
        for name in ("logits", "weights"):
            c, e = cert[f"attention/attention_entropy_bound_{name}"], exact[f"attention/attention_entropy_bound_{name}"]
            assert np.isfinite(c).all() and (c <= e + 1e-6).all() and (c <= measured + 1e-6).all(), name
        c, e = cert["attention/attention_entropy_bound_logits"], exact["attention/attention_entropy_bound_logits"]
        assert c.mean() >= 0.5 * e.mean()  # and not much lower (the weights bounds are ~0 either way here)
    # exact == the per-head reference (attention_entropy_bounds, what the sweep computed before), at
    # the first checkpoint, where the bounds are not all ~0.
    state = next(iter(states.values()))
    exact, inter = jax.device_get(_stats(graphdef, state, tokens, "exact"))
    x_BxTxD, logits_BxHxTxT = inter["attention_inputs"][0], inter["attention_logits"][0]
    w_q, w_k = nnx.merge(graphdef, *state).query_key_kernels(0)
    for b in range(4):
        for h in range(mcfg.num_heads):
            with jax.enable_x64(True):
                ref = probes.attention_entropy_bounds(np.float64(logits_BxHxTxT[b, h]), causal=True,
                                                      w_q=np.float64(w_q[h]), w_k=np.float64(w_k[h]),
                                                      x=np.float64(x_BxTxD[b]))
            for name in ("row", "logits", "weights"):
                np.testing.assert_allclose(exact[f"attention/attention_entropy_bound_{name}"][b, 0, h],
                                           float(np.mean(ref[f"bound_{name}"])), rtol=1e-4, atol=1e-30,
                                           err_msg=name)  # float32 vs float64, amplified by s ~ 20


def test_attention_evaluator_records_the_norm_method() -> None:
    info = ModelInfo(num_layers=1, num_heads=2, weight_paths=())
    forward = {f"attention/{m}": np.full((3, 1, 2), 0.5) for m in ATTENTION_METRICS}
    ctx = lambda exact: Context(forward={**forward, EXACT_NORMS_KEY: np.full(3, float(exact))}, params=None,
                                mesh=None, spectra={})
    rows = {key[3]: note for key, _, note in Attention("attention", {}, info).run(ctx(False))}
    assert rows["attention_entropy_bound_logits"] == rows["attention_entropy_bound_weights"] == "norm=certified"
    assert rows["attention_entropy"] == rows["attention_entropy_bound_row"] == ""
    rows = {key[3]: note for key, _, note in Attention("attention", {"norm": "exact"}, info).run(ctx(True))}
    assert rows["attention_entropy_bound_logits"] == "norm=exact"
    with pytest.raises(ValueError, match="asks for norm='exact'"):
        list(Attention("attention", {"norm": "exact"}, info).run(ctx(False)))
    with pytest.raises(ValueError, match="norm must be one of"):
        Attention("attention", {"norm": "svd"}, info)
