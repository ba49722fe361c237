"""Attention and predictive entropy: closed forms, blocked == dense, Theorem 3.1 bound."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from entropy_jax import probes

REF = Path(__file__).resolve().parent / "testdata" / "reference"


def test_bound_reference_values_t128() -> None:
    values = json.loads((REF / "values.json").read_text())["values"]["attention_entropy_lower_bound_T128"]
    for s, expected in values.items():
        got = float(probes.attention_entropy_lower_bound(float(s), 128))
        assert abs(got - expected) < 1e-9, s
    assert float(probes.attention_entropy_lower_bound(0.0, 128)) == pytest.approx(np.log(128), abs=1e-12)


def test_uniform_and_one_hot_logits() -> None:
    b, h, t = 2, 3, 9
    out = probes.attention_entropy(jnp.zeros((b, h, t, t)), causal=True)
    t_i = np.arange(1, t + 1)
    np.testing.assert_allclose(out["row"], np.broadcast_to(np.log(t_i), (b, h, t)), atol=1e-6)
    np.testing.assert_allclose(out["row_normalised"][..., 1:], 1.0, atol=1e-6)
    assert np.isnan(out["row_normalised"][..., 0]).all()
    assert out["head"].shape == (h,) and out["layer"].shape == ()
    np.testing.assert_allclose(out["head"], np.log(t_i).mean(), atol=1e-6)
    one_hot = jnp.broadcast_to(jnp.where(jnp.eye(t, dtype=bool), 0.0, -1e4), (4, b, h, t, t))
    out = probes.attention_entropy(one_hot)
    np.testing.assert_allclose(out["row"], 0.0, atol=1e-6)
    assert out["head"].shape == (4, h) and out["layer"].shape == (4,)


def test_entropy_matches_scipy_with_padding_mask() -> None:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 2, 5, 7)) * 3
    mask = np.ones((2, 1, 1, 7), bool)
    mask[1, ..., 5:] = False  # second example: last two keys are padding
    out = probes.attention_entropy(jnp.asarray(z, jnp.float32), mask)
    p = scipy.special.softmax(np.where(mask, z, -np.inf), axis=-1)
    np.testing.assert_allclose(out["row"], scipy.stats.entropy(p, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(out["num_keys"][1], 5)


@pytest.mark.parametrize("causal", [False, True])
def test_blocked_equals_dense(causal: bool) -> None:
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 3, 37, 8)) * 2, jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 3, 37, 8)) * 2, jnp.float32)
    dense = probes.attention_entropy(jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8), causal=causal)
    blocked = probes.attention_entropy_blocked(q, k, causal=causal, key_block=8)  # 37 keys: ragged last block
    for key in ("row", "head", "layer", "head_normalised", "num_keys"):
        np.testing.assert_allclose(blocked[key], dense[key], rtol=2e-5, atol=2e-6, err_msg=key)


@pytest.mark.parametrize("causal", [False, True])
def test_measured_entropy_never_below_bounds(causal: bool) -> None:
    rng = np.random.default_rng(2)
    t, d, dh = 32, 16, 8
    for scale in [0.01, 0.1, 0.5, 1.0, 3.0, 10.0, 30.0]:
        x = rng.standard_normal((t, d))
        w_q, w_k = rng.standard_normal((d, dh)) * scale / 4, rng.standard_normal((d, dh)) / 4
        logits = (x @ w_q) @ (x @ w_k).T
        with jax.enable_x64(True):
            out = probes.attention_entropy_bounds(logits, causal=causal, w_q=w_q, w_k=w_k, x=x)
            out = jax.tree.map(np.asarray, out)
        tol = 1e-9
        assert np.all(out["measured"] >= out["bound_row"] - tol), scale
        assert np.all(out["bound_row"] >= out["bound_logits"] - tol), scale
        assert np.all(out["bound_logits"] >= out["bound_weights"] - tol), scale


def test_bound_is_tight_for_its_extremal_row() -> None:
    # The minimiser puts s sqrt((T-1)/T) on one logit and -s/sqrt(T(T-1)) on the others.
    t, s = 10, 4.0
    z = np.full(t, -s / np.sqrt(t * (t - 1)))
    z[0] = s * np.sqrt((t - 1) / t)
    ent = scipy.stats.entropy(scipy.special.softmax(z))
    assert abs(float(probes.attention_entropy_lower_bound(s, t)) - ent) < 1e-9


def test_head_entropy_bins() -> None:
    ent = jnp.asarray([[0.1, 0.3, 0.6, 1.0], [0.9, 0.95, 0.2, 0.55]])
    out = probes.head_entropy_bins(ent)
    np.testing.assert_allclose(out["fractions"], [2 / 8, 1 / 8, 2 / 8, 3 / 8])
    np.testing.assert_allclose(out["per_layer"], [[0.25, 0.25, 0.25, 0.25], [0.25, 0.0, 0.25, 0.5]])
    np.testing.assert_allclose(probes.head_entropy_bins(ent[0], max_entropy=2.0)["fractions"], [0.5, 0.25, 0.25, 0])


def test_predictive_entropy_and_jit() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal((2, 4, 50)) * 5).astype(np.float32)
    expected = scipy.stats.entropy(scipy.special.softmax(logits.astype(np.float64), -1), axis=-1)
    np.testing.assert_allclose(jax.jit(probes.predictive_entropy)(logits), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(probes.predictive_entropy(jnp.zeros((3, 64))), np.log(64), rtol=1e-6)
    bf16 = probes.predictive_entropy(jnp.asarray(logits, jnp.bfloat16))
    assert bf16.dtype == jnp.float32


def test_float32_entropy_of_peaked_rows_is_accurate_and_above_bound_row() -> None:
    # Near the bound's minimiser (one large logit, the others nearly equal): entropies down to 1e-6 nats,
    # and a bound within 5e-8 nats of them, below the ~1e-6 absolute error of -sum p (z - lse) in float32.
    rng = np.random.default_rng(5)
    t, n = 64, 2048
    z = rng.standard_normal((n, t)) * rng.uniform(0.01, 0.5, (n, 1))
    z[:, 0] += rng.uniform(6, 16, n)
    z = (z - z.mean(1, keepdims=True)).astype(np.float32)
    exact = scipy.stats.entropy(scipy.special.softmax(z.astype(np.float64), axis=1), axis=1)
    out = jax.tree.map(np.asarray, probes.attention_entropy_bounds(z))
    assert out["measured"].dtype == np.float32
    np.testing.assert_allclose(out["measured"], exact, rtol=2e-6)
    assert (out["measured"] >= out["bound_row"]).all(), (out["bound_row"] - out["measured"]).max()


def test_bound_is_zero_at_infinite_norm() -> None:
    bound = np.asarray(probes.attention_entropy_lower_bound(np.array([np.inf, 1e300, 0.0]), np.array([5, 5, 1])))
    np.testing.assert_array_equal(bound, [0.0, 0.0, 0.0])
