"""Traced == eager: every public metric of ``entropy_jax.probes`` gives the same number under
``jax.jit`` as called eagerly, for the same input and default arguments.

Eager spectra run in float64 whatever the input (``x64_when_eager``), a trace in its own float
dtype. Two comparisons: the jitted function under ``jax.enable_x64(True)`` on float64 input
(float64 both ways: tight), and the plain float32 trace on float32 input against the eager
(float64) answer for those float32 values (float32 tolerance). Inputs include the LayerNorm
null direction (rows centred so features sum to zero) and collapsed data (rank 1, constant, 0).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entropy_jax import probes

# Public callables that cannot be traced: host float64 LAPACK / python results by design.
EAGER_ONLY = {
    "spectral_metrics",  # returns python floats, notes and a numpy spectrum
    "diffusion_eigenvalues",
    "diffusion_spectral_entropy",
    "diffusion_spectral_mutual_information",
    "dse_from_eigenvalues",
    "gaussian_kernel",
    "weight_spectra",
}
STATIC = {"causal_mask", "default_alpha_window"}  # python ints in, no data to trace
TYPES = {"AlphaReqResult", "MatrixSpectrum", "ScatterStats"}

# Representation-spectrum metrics: fn(x) with default arguments.
SPECTRAL: dict[str, Callable] = {
    "rankme": probes.rankme,
    "rankme_cov": probes.rankme_cov,
    "von_neumann_entropy": probes.von_neumann_entropy,
    "covariance_spectrum": probes.covariance_spectrum,
    "alpha_req": probes.alpha_req,
    "alpha_req_from_spectrum": lambda x: probes.alpha_req_from_spectrum(
        probes.gram_eigenvalues(x, centred=True)
    ),
    "gram_eigenvalues": lambda x: probes.gram_eigenvalues(x, centred=True),  # centred has no default
    "scatter_stats": probes.scatter_stats,
}


def _data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    scaled = rng.standard_normal((500, 32)) * np.arange(1, 33) ** -0.6
    d = 160
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    powerlaw = (rng.standard_normal((1000, d)) * np.arange(1, d + 1) ** -0.6) @ q.T + 0.5
    return {
        "gauss": rng.standard_normal((500, 32)) + 1.0,
        "layernorm": scaled - scaled.mean(axis=1, keepdims=True),  # exact null direction
        "powerlaw_paper_window": powerlaw,  # numerical rank >= 100: window [11, 100)
        "wide_dual_gram": rng.standard_normal((20, 50)) + 3.0,  # N < D
        "rank1": np.outer(rng.standard_normal(300), rng.standard_normal(24)),
        "rank2": rng.standard_normal((300, 2)) @ rng.standard_normal((2, 24)),
        "constant_rows": np.tile(rng.standard_normal(24) * 3.7 + 1.3, (300, 1)),
        "zeros": np.zeros((300, 24)),
    }


DATA = _data()
REGULAR = ("gauss", "layernorm", "powerlaw_paper_window", "wide_dual_gram")


# RankMe takes square roots of Gram eigenvalues: a rounding-level eigenvalue (~1e-16 of the
# largest, different for each LAPACK driver) is a singular value ~1e-8 of the largest, and the
# 20-odd of them in low-rank data move RankMe by ~3e-7 relative.
RTOL_X64 = {"rankme": 1e-6}


def _assert_same(traced, eager, rtol: float, atol: float, what: str) -> None:
    t_leaves, e_leaves = jax.tree.leaves(traced), jax.tree.leaves(eager)
    assert len(t_leaves) == len(e_leaves), what
    for t, e in zip(t_leaves, e_leaves, strict=True):
        np.testing.assert_allclose(np.asarray(t, np.float64), np.asarray(e, np.float64), rtol=rtol, atol=atol,
                                   err_msg=what)


def test_every_public_name_is_classified() -> None:
    traceable = set(SPECTRAL) | set(ATTENTION) | {"matrix_spectrum"}
    assert set(probes.__all__) == traceable | EAGER_ONLY | STATIC | TYPES


@pytest.mark.parametrize("data", sorted(DATA))
@pytest.mark.parametrize("name", sorted(SPECTRAL))
def test_spectral_traced_x64_equals_eager(name: str, data: str) -> None:
    fn, x = SPECTRAL[name], DATA[data]
    eager = fn(x)
    with jax.enable_x64(True):
        traced = jax.jit(fn)(jnp.asarray(x, jnp.float64))
    scale = float(np.max(np.abs(np.asarray(probes.gram_eigenvalues(x, centred=False)))))
    # Eigenvalues: absolute to the largest (different LAPACK drivers); metrics: relative.
    atol = 1e-10 * scale if name in ("gram_eigenvalues", "scatter_stats") else 1e-10
    _assert_same(traced, eager, rtol=RTOL_X64.get(name, 1e-9), atol=atol, what=f"{name} on {data}")


@pytest.mark.parametrize("data", REGULAR)
@pytest.mark.parametrize("name", ["rankme", "rankme_cov", "von_neumann_entropy", "alpha_req"])
def test_spectral_traced_float32_equals_eager(name: str, data: str) -> None:
    x32 = DATA[data].astype(np.float32)
    eager, traced = SPECTRAL[name](x32), jax.jit(SPECTRAL[name])(x32)
    assert jax.tree.leaves(traced)[0].dtype == jnp.float32
    # RankMe takes square roots of Gram eigenvalues: a float32 null direction (~1e-7 of the
    # largest eigenvalue) becomes a singular value ~3e-4 of the largest, hence rtol 1e-3 there.
    rtol = 1e-3 if name == "rankme" else 2e-4
    _assert_same(traced, eager, rtol=rtol, atol=1e-5, what=f"{name} on {data}")


def test_alpha_default_window_under_jit_skips_the_layernorm_null_direction() -> None:
    """The reported failure: under jit the default window included the null direction."""
    x = DATA["layernorm"]
    eager = probes.alpha_req(x)
    window = probes.alpha_req(x, (0, 31))
    assert float(eager.alpha) == pytest.approx(float(window.alpha), rel=1e-12)
    assert float(jax.jit(probes.alpha_req)(x.astype(np.float32)).alpha) == pytest.approx(float(eager.alpha), rel=1e-4)
    with jax.enable_x64(True):
        assert float(jax.jit(probes.alpha_req)(x).alpha) == pytest.approx(float(eager.alpha), rel=1e-10)
    with pytest.raises(ValueError, match=r"window \[0, 32\) include zeros"):  # the null direction is exactly 0
        probes.alpha_req(x, (0, 32))


def test_spectral_metrics_equals_traced_metrics() -> None:
    """spectral_metrics is eager only; its numbers equal the jitted (x64) single metrics."""
    for data in ("layernorm", "powerlaw_paper_window", "rank1", "zeros"):
        x = DATA[data]
        m = probes.spectral_metrics(x)
        with jax.enable_x64(True):
            xj = jnp.asarray(x)
            fit = jax.jit(probes.alpha_req)(xj)
            traced = {
                "rankme": jax.jit(probes.rankme)(xj),
                "rankme_cov": jax.jit(probes.rankme_cov)(xj),
                "von_neumann_entropy": jax.jit(probes.von_neumann_entropy)(xj),
                "von_neumann_entropy_uncentred": jax.jit(lambda a: probes.von_neumann_entropy(a, centred=False))(xj),
                "alpha_req": fit.alpha,
                "alpha_req_r2": fit.r2,
                "alpha_req_r2_100": fit.r2_100,
                "alpha_req_r2_window": fit.r2_window,
            }
        for key, value in traced.items():
            np.testing.assert_allclose(m[key], float(value), rtol=RTOL_X64.get(key, 1e-9), atol=1e-12,
                                       err_msg=f"{key} on {data}")


def _attention_inputs() -> dict[str, tuple]:
    rng = np.random.default_rng(1)
    z = (rng.standard_normal((2, 3, 6, 6)) * 3).astype(np.float32)
    mask = np.ones((2, 1, 6, 6), bool)
    mask[1, :, 2, :] = False  # a fully masked row: NaN
    t, d, dh = 12, 5, 4
    x = rng.standard_normal((t, d)).astype(np.float32)
    w_q, w_k = rng.standard_normal((d, dh)).astype(np.float32), rng.standard_normal((d, dh)).astype(np.float32)
    return {
        "z": z, "mask": mask, "x": x, "w_q": w_q, "w_k": w_k, "head_logits": (x @ w_q) @ (x @ w_k).T,
        "q": rng.standard_normal((2, 3, 9, 4)).astype(np.float32),
        "k": rng.standard_normal((2, 3, 7, 4)).astype(np.float32),  # Tq > Tk: causal rows without keys
    }


AI = _attention_inputs()
ATTENTION: dict[str, tuple[Callable, tuple]] = {
    "attention_entropy": (lambda z, m: probes.attention_entropy(z, m), (AI["z"], AI["mask"])),
    "attention_entropy_blocked": (lambda q, k: probes.attention_entropy_blocked(q, k, causal=True), (AI["q"], AI["k"])),
    "attention_entropy_bounds": (
        lambda z, wq, wk, x: probes.attention_entropy_bounds(z, causal=True, w_q=wq, w_k=wk, x=x),
        (AI["head_logits"], AI["w_q"], AI["w_k"], AI["x"]),
    ),
    "attention_entropy_lower_bound": (probes.attention_entropy_lower_bound,
                                      (np.array([0.0, 0.5, 3.0, 40.0, 1.0]), np.array([128, 2, 7, 50, 0]))),
    "row_entropy": (probes.row_entropy, (AI["z"], AI["mask"])),
    "predictive_entropy": (probes.predictive_entropy, (AI["z"][0, 0],)),
    "head_entropy_bins": (probes.head_entropy_bins, (np.abs(AI["z"][0, :, :, 0]),)),
}


@pytest.mark.parametrize("name", sorted(ATTENTION))
def test_attention_traced_equals_eager(name: str) -> None:
    fn, args = ATTENTION[name]
    _assert_same(jax.jit(fn)(*args), fn(*args), rtol=1e-5, atol=1e-6, what=name)
    with jax.enable_x64(True):
        args64 = tuple(jnp.asarray(a, jnp.float64) if np.asarray(a).dtype.kind == "f" else a for a in args)
        _assert_same(jax.jit(fn)(*args64), fn(*args64), rtol=1e-12, atol=1e-12, what=name)


def test_matrix_spectrum_traced_equals_eager() -> None:
    w = np.random.default_rng(2).standard_normal((12, 7))
    eager = probes.matrix_spectrum(w)
    with jax.enable_x64(True):
        _assert_same(jax.jit(probes.matrix_spectrum)(jnp.asarray(w)), eager, rtol=1e-12, atol=0, what="x64")
    _assert_same(jax.jit(probes.matrix_spectrum)(w.astype(np.float32)), probes.matrix_spectrum(w.astype(np.float32)),
                 rtol=1e-4, atol=0, what="float32")
