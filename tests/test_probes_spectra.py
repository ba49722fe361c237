"""Representation-spectrum probes: reference values, closed forms, sharding, float64, errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from entropy_jax import probes
from entropy_jax.probes.stats import paired_eigenvalues
from entropy_jax.sharding import make_mesh

REF = Path(__file__).resolve().parent / "testdata" / "reference"
NAMES = ["X_gauss_500x32", "X_sub5_500x64", "X_cls_500x32", "X_powerlaw1p2_2000x256"]
RTOL = 1e-6


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REF / "values.json").read_text())["values"]


def _load(name: str) -> np.ndarray:
    return np.load(REF / f"{name}.npy")


def _window(key: str) -> tuple[int, int]:
    a, b = key.strip("[)").split(",")
    return int(a), int(b)


@pytest.mark.parametrize("name", NAMES)
def test_reference_values(ref: dict, name: str) -> None:
    x, r = _load(name), ref[name]
    np.testing.assert_allclose(float(probes.rankme(x)), r["rankme_garrido"], rtol=RTOL)
    np.testing.assert_allclose(float(probes.rankme_cov(x)), r["rankme_tracing"], rtol=RTOL)
    vn = r["von_neumann_nats"]
    np.testing.assert_allclose(float(probes.von_neumann_entropy(x, centred=True)), vn["centred"], rtol=RTOL)
    np.testing.assert_allclose(float(probes.von_neumann_entropy(x, centred=False)), vn["uncentred"], rtol=RTOL)
    for key, expected in r["alpha_req"].items():
        if expected is None:
            with pytest.raises(ValueError, match="fit window"):
                probes.alpha_req(x, _window(key))
            continue
        fit = probes.alpha_req(x, _window(key))
        np.testing.assert_allclose(float(fit.alpha), expected["alpha"], rtol=RTOL)
        np.testing.assert_allclose(float(fit.r2), expected["R2"], rtol=RTOL)
        np.testing.assert_allclose(float(fit.r2_100), expected["R2_100"], rtol=RTOL)


def test_spectral_metrics_one_pass_equals_individual_functions_sharded(ref: dict) -> None:
    x = _load("X_powerlaw1p2_2000x256")[:1998]  # 1998 rows: not a multiple of the 4 devices
    m = probes.spectral_metrics(x, mesh=make_mesh(4))
    fit = probes.alpha_req(x)
    expected = {
        "rankme": probes.rankme(x),
        "rankme_cov": probes.rankme_cov(x),
        "alpha_req": fit.alpha,
        "alpha_req_r2": fit.r2,
        "von_neumann_entropy": probes.von_neumann_entropy(x, centred=True),
        "von_neumann_entropy_uncentred": probes.von_neumann_entropy(x, centred=False),
    }
    for key, value in expected.items():
        assert isinstance(m[key], float)
        np.testing.assert_allclose(m[key], float(value), rtol=RTOL, err_msg=key)
    assert (m["alpha_fit_start"], m["alpha_fit_stop"]) == (11, 100)
    np.testing.assert_allclose(m["spectrum"], np.asarray(probes.covariance_spectrum(x)), rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(m["spectrum"].sum(), 1.0, rtol=1e-12)


def test_sharded_scatter_equals_numpy_with_large_mean() -> None:
    rng = np.random.default_rng(1)
    x = 1e4 + rng.standard_normal((203, 7))  # large mean: naive X^T X / N - mu mu^T would cancel
    stats = probes.scatter_stats(x.astype(np.float32), make_mesh(4))
    x32 = x.astype(np.float32).astype(np.float64)
    xc = x32 - x32.mean(0)
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(stats.m2), xc.T @ xc, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(np.asarray(stats.mean), x32.mean(0), rtol=1e-12)
    assert float(stats.n) == 203
    single = probes.spectral_metrics(x)
    sharded = probes.spectral_metrics(x, mesh=make_mesh(4))
    for key in ("rankme", "rankme_cov", "alpha_req", "von_neumann_entropy"):
        np.testing.assert_allclose(sharded[key], single[key], rtol=1e-9)


def test_closed_forms_identity_and_rank_k() -> None:
    rng = np.random.default_rng(2)
    d, n = 16, 400
    a = rng.standard_normal((n, d))
    q, _ = np.linalg.qr(a - a.mean(0))  # centred, orthonormal columns: covariance = identity
    np.testing.assert_allclose(float(probes.von_neumann_entropy(q, centred=True)), np.log(d), rtol=1e-12)
    np.testing.assert_allclose(float(probes.von_neumann_entropy(q, centred=False)), np.log(d), rtol=1e-12)
    np.testing.assert_allclose(float(probes.rankme(q)), d, rtol=1e-5)
    np.testing.assert_allclose(float(probes.rankme_cov(q)), d, rtol=1e-5)
    k = 5
    u, _ = np.linalg.qr(rng.standard_normal((n, k)))
    v, _ = np.linalg.qr(rng.standard_normal((d, k)))
    np.testing.assert_allclose(float(probes.rankme(u @ v.T)), k, rtol=1e-4)


def test_powerlaw_exponent_recovered(ref: dict) -> None:
    fit = probes.alpha_req(_load("X_powerlaw1p2_2000x256"))
    assert abs(float(fit.alpha) - 1.2) < 0.02
    assert float(fit.r2_window) > 0.98


def test_small_d_default_window_and_numpy_fit() -> None:
    rng = np.random.default_rng(3)
    d = 24
    x = rng.standard_normal((300, d)) * np.arange(1, d + 1) ** -0.75
    assert probes.default_alpha_window(d) == (0, d)
    fit = probes.alpha_req(x)
    xc = x - x.mean(0)
    ev = np.sort(np.linalg.eigvalsh(xc.T @ xc))[::-1]
    r = np.arange(1, d + 1)
    a = np.stack([-np.log(r), np.ones(d)], 1) * np.sqrt(1.0 / r)[:, None]
    coef = np.linalg.lstsq(a, np.log(ev) * np.sqrt(1.0 / r), rcond=None)[0]
    np.testing.assert_allclose(float(fit.alpha), coef[0], rtol=1e-6)
    np.testing.assert_allclose(float(fit.alpha), 1.5, atol=0.3)


def test_dual_gram_side_when_n_below_d() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((20, 50)) + 3.0
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum() + 1e-7
    np.testing.assert_allclose(float(probes.rankme(x)), np.exp(-(p * np.log(p)).sum()), rtol=1e-9)
    xc = x - x.mean(0)
    lam = np.clip(np.linalg.eigvalsh(xc @ xc.T), 0, None)
    lam = lam[lam > 1e-12 * lam.max()] / lam.sum()
    np.testing.assert_allclose(float(probes.von_neumann_entropy(x)), -(lam * np.log(lam)).sum(), rtol=1e-9)
    assert probes.covariance_spectrum(x).shape == (20,)
    fit = probes.alpha_req(x)  # default window [0, N - 1) skips the zero centred eigenvalue
    assert np.isfinite(float(fit.alpha))


def test_float32_input_gives_float64_answers(ref: dict) -> None:
    x32 = _load("X_powerlaw1p2_2000x256").astype(np.float32)
    x64 = x32.astype(np.float64)
    s = np.linalg.svd(x64, compute_uv=False)
    p = s / s.sum() + 1e-7
    np.testing.assert_allclose(float(probes.rankme(x32)), np.exp(-(p * np.log(p)).sum()), rtol=1e-10)
    m32, m64 = probes.spectral_metrics(x32), probes.spectral_metrics(x64)
    for key in ("rankme", "rankme_cov", "alpha_req", "von_neumann_entropy"):
        np.testing.assert_allclose(m32[key], m64[key], rtol=1e-10, err_msg=key)
    assert probes.rankme(x32).dtype == np.float64


def test_jit_compatible() -> None:
    x = np.random.default_rng(5).standard_normal((64, 8)).astype(np.float32)
    jitted = jax.jit(probes.rankme_cov)(x)
    np.testing.assert_allclose(float(jitted), float(probes.rankme_cov(x)), rtol=1e-4)
    fit = jax.jit(lambda a: probes.alpha_req(a, (0, 8)))(x)
    np.testing.assert_allclose(float(fit.alpha), float(probes.alpha_req(x, (0, 8)).alpha), rtol=1e-3)


def test_bad_inputs_raise_clear_errors() -> None:
    x = np.random.default_rng(6).standard_normal((50, 4))
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        probes.rankme(bad)
    with pytest.raises(ValueError, match="NaN or Inf"):
        probes.spectral_metrics(np.where(np.isnan(bad), np.inf, bad))
    with pytest.raises(ValueError, match="at least 2 samples"):
        probes.von_neumann_entropy(x[:1])
    with pytest.raises(ValueError, match="2-D"):
        probes.rankme_cov(x[:, 0])
    with pytest.raises(ValueError, match="fit window"):
        probes.alpha_req(x, (2, 10))


def test_block_gram_and_shared_tridiagonalisation_match_numpy() -> None:
    rng = np.random.default_rng(7)
    x = rng.standard_normal((40, 600)) + 50.0  # D > 512: the block-triangular scatter path
    stats = probes.scatter_stats(x, make_mesh(4))
    xc = x - x.mean(0)
    np.testing.assert_allclose(np.asarray(stats.m2), xc.T @ xc, rtol=1e-10, atol=1e-9)
    with jax.enable_x64(True):
        ev_c, ev_u = paired_eigenvalues(stats, 40)
    np.testing.assert_allclose(ev_c, np.linalg.eigvalsh(xc @ xc.T)[::-1], rtol=1e-8, atol=1e-8 * float(ev_c[0]))
    np.testing.assert_allclose(ev_u, np.linalg.eigvalsh(x @ x.T)[::-1], rtol=1e-10)


def test_default_alpha_window_stops_at_the_layernorm_null_direction():
    """Features centred per row (as LayerNorm does) have an exact null direction; rounding makes its
    eigenvalue ~1e-13 of the largest. The default window must leave it out, or alpha measures rounding."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2000, 32)) * np.arange(1, 33) ** -0.6
    x = x - x.mean(axis=1, keepdims=True)
    m64, m32 = probes.spectral_metrics(x), probes.spectral_metrics(x.astype(np.float32))
    assert (m64["alpha_fit_start"], m64["alpha_fit_stop"]) == (0, 31)
    assert float(probes.alpha_req(x).alpha) == pytest.approx(float(probes.alpha_req(x, (0, 31)).alpha), rel=1e-12)
    assert m64["alpha_req"] == pytest.approx(float(probes.alpha_req(x, (0, 31)).alpha), rel=1e-9)
    assert m32["alpha_req"] == pytest.approx(m64["alpha_req"], rel=1e-5)
    with_null = probes.alpha_req(x, (0, 32)).alpha  # the rounding-dominated fit the default avoids
    assert abs(float(with_null) - m64["alpha_req"]) > 0.1
