"""Matrix-free DSE (stochastic Lanczos quadrature): official values, closed forms, the quadrature
bracket, the stated standard error, padding, memory, and the exact/estimate switch."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.spatial.distance

from entropy_jax.probes import diffusion, diffusion_slq

REF = Path(__file__).resolve().parent / "testdata" / "reference"


def _ln_like(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows of a power-law Gaussian after LayerNorm (centred, unit variance per row)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.8 @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    x += rng.standard_normal(d)
    return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)


@pytest.mark.parametrize("name,key", [("X_gauss_500x32", "sigma=10,t=1"), ("X_gauss_500x32", "sigma=3,t=1"),
                                      ("X_gauss_500x32", "sigma=10,t=2"), ("X_cls_500x32", "sigma=10,t=1")])
def test_slq_matches_official_values_within_its_stated_error(name: str, key: str) -> None:
    expected = json.loads((REF / "values.json").read_text())["values"][name]["dse_bits"][key]
    sigma, t = float(key.split(",")[0][6:]), int(key.split("=")[-1])
    est = diffusion_slq.diffusion_spectral_entropy_slq(np.load(REF / f"{name}.npy"), sigma, t)
    assert est.method == "slq" and est.n == 500 and est.stderr > 0
    assert abs(est.bits - expected) <= 3 * est.stderr + est.quadrature_halfgap + 1e-4, (est, expected)
    assert abs(est.bits - expected) <= 0.01 * expected


def test_far_apart_points_give_log2_n_exactly() -> None:
    # K = identity: the Krylov space of every start vector is exhausted after one step. The points'
    # scale (|x|^2 / sigma^2 ~ 1e9) would round the diagonal of G in float32: the tiles run in float64.
    far = np.arange(500)[:, None] * 100.0 * np.ones((1, 32))
    est = diffusion_slq.diffusion_spectral_entropy_slq(far, 1.0)
    assert abs(est.bits - np.log2(500)) < 1e-9 and est.quadrature_halfgap < 1e-12


def test_gauss_and_radau_rules_bracket_the_quadratic_form() -> None:
    x = _ln_like(200, 8, seed=1)
    sigma = diffusion.median_distance(x)
    g = np.exp(-scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(x, "sqeuclidean")) / (2 * sigma**2))
    s = 1 / np.sqrt(g.sum(1))
    lam, vec = np.linalg.eigh(s[:, None] * g * s[None, :])
    lam = np.clip(lam, 0, None)
    v = np.random.default_rng(2).standard_normal((200, 3))
    exact = np.einsum("ij,i,ij->j", vec.T @ v, lam * np.log(np.where(lam > 0, lam, 1)), vec.T @ v)
    with jax.enable_x64(True):
        a, b = diffusion_slq._lanczos(jnp.asarray(x - x.mean(0)), jnp.asarray(s), jnp.asarray(v),
                                      jnp.asarray(1 / (2 * sigma**2)), 200, jnp.float64, 6)
    for j in range(3):
        _, gauss, radau = diffusion_slq._quadrature(np.asarray(a[:, j]), np.asarray(b[:, j]), 1)
        quad = np.array([gauss, radau]) * (v[:, j] @ v[:, j])
        assert quad[0] < exact[j] < quad[1], (quad, exact[j])  # six nodes: not yet exact, but bracketed


def test_stated_standard_error_matches_the_spread_over_seeds() -> None:
    x = _ln_like(500, 32, seed=3)
    sigma = diffusion.median_distance(x)
    runs = [diffusion_slq.diffusion_spectral_entropy_slq(x, sigma, seed=seed) for seed in range(6)]
    spread = np.std([r.bits for r in runs], ddof=1)
    stated = np.mean([r.stderr for r in runs])
    assert 0.4 < spread / stated < 2.5, (spread, stated)
    exact = diffusion.diffusion_spectral_entropy(x, sigma, max_samples=None)
    assert abs(np.mean([r.bits for r in runs]) - exact) < 3 * stated / np.sqrt(len(runs)) + 1e-3


def test_padding_rows_do_not_change_the_estimate() -> None:
    x = _ln_like(500, 32, seed=4)
    one_tile = diffusion_slq.diffusion_spectral_entropy_slq(x, 5.0, tile=500)
    padded = diffusion_slq.diffusion_spectral_entropy_slq(x, 5.0)  # tiles of 256: 12 padding rows
    assert abs(one_tile.bits - padded.bits) < 1e-6 and abs(one_tile.stderr - padded.stderr) < 1e-6


def test_memory_is_linear_in_n_at_fifty_thousand_rows() -> None:
    n, d, cols = 50_176, 32, 64
    with jax.enable_x64(True):
        args = (jax.ShapeDtypeStruct((n, d), jnp.float64), jax.ShapeDtypeStruct((n,), jnp.float64),
                jax.ShapeDtypeStruct((n, cols), jnp.float64), jax.ShapeDtypeStruct((), jnp.float64))
        compiled = jax.jit(diffusion_slq._lanczos, static_argnums=(4, 5, 6)).lower(*args, 256, jnp.float32, 4).compile()
    stats = compiled.memory_analysis()
    total = stats.temp_size_in_bytes + stats.argument_size_in_bytes + stats.output_size_in_bytes
    assert total < 400 * 2**20, total / 2**20  # the dense N x N float64 kernel alone is 20 GB


def test_dse_estimate_switches_at_the_threshold_and_says_which() -> None:
    x = _ln_like(500, 32, seed=5)
    exact = diffusion_slq.dse_estimate(x, 10.0, exact_max=500)
    assert exact.method == "exact" and exact.note() == "exact, N=500"
    assert exact.bits == diffusion.diffusion_spectral_entropy(x, 10.0, max_samples=None)
    est = diffusion_slq.dse_estimate(x, 10.0, exact_max=499)
    assert est.method == "slq" and est.note().startswith("slq, N=500: standard error")
    assert abs(est.bits - exact.bits) <= 3 * est.stderr + est.quadrature_halfgap + 1e-4


def test_median_distance_is_the_median_of_pdist_and_makes_dse_scale_invariant() -> None:
    x = _ln_like(300, 12, seed=6)
    assert abs(diffusion.median_distance(x) - np.median(scipy.spatial.distance.pdist(x))) < 1e-10
    sub = x[np.array(__import__("random").Random(0).sample(range(300), k=100))]
    assert diffusion.median_distance(x, max_rows=100) == pytest.approx(np.median(scipy.spatial.distance.pdist(sub)))
    dse = [diffusion.diffusion_spectral_entropy(c * x, diffusion.median_distance(c * x)) for c in (1.0, 7.0)]
    assert abs(dse[0] - dse[1]) < 1e-9


def test_bad_arguments_raise_one_clear_error() -> None:
    with pytest.raises(ValueError, match="sigma > 0 and an integer diffusion time"):
        diffusion_slq.diffusion_spectral_entropy_slq(np.ones((10, 2)), sigma=0.0)
