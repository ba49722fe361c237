"""Diffusion spectral entropy / mutual information: official values, dense numpy check, sharding."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest

from entropy_jax import probes
from entropy_jax.sharding import make_mesh

REF = Path(__file__).resolve().parent / "testdata" / "reference"
NAMES = ["X_gauss_500x32", "X_sub5_500x64", "X_cls_500x32", "X_powerlaw1p2_2000x256"]


@pytest.fixture(scope="module")
def ref() -> dict:
    return json.loads((REF / "values.json").read_text())["values"]


def _params(key: str) -> tuple[float, int]:
    sigma, t = key.split(",")
    return float(sigma.split("=")[1]), int(t.split("=")[1])


@functools.cache
def _eigenvalues(name: str, sigma: float) -> np.ndarray:
    return probes.diffusion_eigenvalues(np.load(REF / f"{name}.npy"), sigma)


def _dense_numpy_dse(x: np.ndarray, sigma: float, t: int) -> float:
    """The official algorithm written out densely (distance matrix, diag degree matrix, products)."""
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    g = np.exp(-(dist**2) / (2 * sigma**2))
    deg = np.diag(1 / np.sum(g, axis=1) ** 0.5)
    lam = np.abs(np.linalg.eigvalsh(deg @ g @ deg)) ** t
    p = lam / lam.sum() + np.finfo(float).eps
    return float(-np.sum(p * np.log2(p)))


@pytest.mark.parametrize("name", NAMES)
def test_dse_reference_values(ref: dict, name: str) -> None:
    for key, expected in ref[name]["dse_bits"].items():
        sigma, t = _params(key)
        assert abs(probes.dse_from_eigenvalues(_eigenvalues(name, sigma), t) - expected) < 1e-6, key
    if name.endswith("500x32"):  # the public entry point itself, on a small input
        key, expected = next(iter(ref[name]["dse_bits"].items()))
        got = probes.diffusion_spectral_entropy(np.load(REF / f"{name}.npy"), *_params(key))
        assert abs(got - expected) < 1e-6


def test_dsmi_reference_values_reproduce_official_rng(ref: dict) -> None:
    y = np.load(REF / "y_cls_500.npy")
    inputs = {
        "X_cls_500x32;y_cls_500": ("X_cls_500x32", y),
        "X_cls_500x32;labels permuted (default_rng(123))": ("X_cls_500x32", np.random.default_rng(123).permutation(y)),
        "X_gauss_500x32;y_cls_500": ("X_gauss_500x32", y),
    }
    for case, (name, labels) in inputs.items():
        x = np.load(REF / f"{name}.npy")
        for key, expected in ref["dsmi_bits"][case].items():
            sigma, t = _params(key)
            got = probes.diffusion_spectral_mutual_information(x, labels, sigma, t)
            # The Python-random subsets are reproduced exactly, so this is far inside the 0.05 bit budget.
            assert abs(got - expected) < 1e-9, (case, key)


def test_dse_matches_dense_numpy_and_closed_form_bounds() -> None:
    x = np.random.default_rng(0).standard_normal((120, 6)) * 2.0
    for sigma, t in [(1.0, 1), (3.0, 2), (10.0, 1)]:
        got = probes.diffusion_spectral_entropy(x, sigma, t)
        assert abs(got - _dense_numpy_dse(x, sigma, t)) < 1e-9
        assert 0.0 <= got <= np.log2(len(x)) + 1e-9
    # Far-apart points: K -> identity, every eigenvalue 1, DSE = log2 N.
    far = np.arange(50)[:, None] * 100.0 * np.ones((1, 3))
    assert abs(probes.diffusion_spectral_entropy(far, 1.0) - np.log2(50)) < 1e-9


def test_dse_sharded_equals_single_device() -> None:
    x = np.random.default_rng(1).standard_normal((203, 5)).astype(np.float32)
    k1 = probes.gaussian_kernel(x.astype(np.float64), 2.0)
    k4 = probes.gaussian_kernel(x.astype(np.float64), 2.0, mesh=make_mesh(4), block=16)
    np.testing.assert_allclose(k4, k1, rtol=1e-12, atol=1e-14)
    single = probes.diffusion_spectral_entropy(x, 2.0)
    assert abs(probes.diffusion_spectral_entropy(x, 2.0, mesh=make_mesh(4)) - single) < 1e-9


def test_subsampling_uses_python_random_like_the_official_code() -> None:
    x = np.random.default_rng(2).standard_normal((90, 4))
    random.seed(0)
    rows = np.array(random.sample(range(90), k=40))
    expected = probes.diffusion_spectral_entropy(x[rows], 3.0, max_samples=None)
    assert abs(probes.diffusion_spectral_entropy(x, 3.0, max_samples=40, seed=0) - expected) < 1e-12


def test_dsmi_continuous_labels_are_binned() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 3))
    scalar = rng.uniform(size=100)
    bins = np.digitize((scalar - scalar.min()) / np.ptp(scalar), np.linspace(0, 1, 11)[:-1])
    got = probes.diffusion_spectral_mutual_information(x, scalar, 3.0)
    assert abs(got - probes.diffusion_spectral_mutual_information(x, bins, 3.0)) < 1e-12


def test_bad_inputs_raise_clear_errors() -> None:
    x = np.random.default_rng(4).standard_normal((30, 3))
    with pytest.raises(ValueError, match="one entry per row"):
        probes.diffusion_spectral_mutual_information(x, np.zeros(29, int))
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        probes.diffusion_spectral_entropy(bad)
    with pytest.raises(ValueError, match="at least 2 samples"):
        probes.diffusion_spectral_entropy(x[:1])


@pytest.mark.parametrize("two_stage_min", [4096, 0])  # one-stage dsyevd at n = 300; dsyevd_2stage forced
def test_in_place_eigensolver_matches_numpy(monkeypatch, two_stage_min) -> None:
    monkeypatch.setattr(probes.lapack, "EIGVALSH_TWO_STAGE_MIN", two_stage_min)
    a = np.random.default_rng(5).standard_normal((300, 300))
    sym = a @ a.T / 300 + np.eye(300)
    expected = np.linalg.eigvalsh(sym)
    np.testing.assert_allclose(probes.lapack.symmetric_eigvalsh_inplace(sym.copy()), expected, rtol=1e-12)
