"""Weight spectra: KappaTune condition numbers, norms, pytree paths, errors."""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from entropy_jax import probes

REF = Path(__file__).resolve().parent / "testdata" / "reference"


def test_kappa_reference_values() -> None:
    values = json.loads((REF / "values.json").read_text())["values"]
    for name in ["X_gauss_500x32", "X_sub5_500x64", "X_cls_500x32", "X_powerlaw1p2_2000x256"]:
        spec = probes.matrix_spectrum(np.load(REF / f"{name}.npy"))
        np.testing.assert_allclose(float(spec.condition_number), values[name]["kappa"], rtol=1e-6, err_msg=name)


def test_weight_spectra_paths_and_numpy_values() -> None:
    rng = np.random.default_rng(0)
    params = {
        "blocks": [{"attn": {"wq": rng.standard_normal((8, 2, 4)), "bias": np.zeros(8)}}],
        "embed": {"embedding": jnp.asarray(rng.standard_normal((16, 8)), jnp.bfloat16)},
    }
    out = probes.weight_spectra(params)
    assert set(out) == {"blocks/0/attn/wq", "embed/embedding"}
    w = params["blocks"][0]["attn"]["wq"].reshape(8, -1)
    s = np.linalg.svd(w, compute_uv=False)
    got = out["blocks/0/attn/wq"]
    np.testing.assert_allclose(got["singular_values"], s, rtol=1e-12)
    np.testing.assert_allclose(got["spectral_norm"], np.linalg.norm(w, 2), rtol=1e-12)
    np.testing.assert_allclose(got["frobenius_norm"], np.linalg.norm(w), rtol=1e-12)
    np.testing.assert_allclose(got["stable_rank"], np.linalg.norm(w) ** 2 / s[0] ** 2, rtol=1e-12)
    np.testing.assert_allclose(got["condition_number"], s[0] / s[-1], rtol=1e-12)
    e = np.asarray(params["embed"]["embedding"], np.float64)  # bf16 upcast before the SVD
    np.testing.assert_allclose(out["embed/embedding"]["condition_number"], np.linalg.cond(e), rtol=1e-9)


def test_float32_weight_gives_float64_singular_values() -> None:
    w = np.random.default_rng(1).standard_normal((40, 30)).astype(np.float32)
    spec = probes.matrix_spectrum(w)
    assert spec.singular_values.dtype == np.float64
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(float(spec.condition_number), s[0] / s[-1], rtol=1e-12)


def test_non_matrix_raises() -> None:
    with pytest.raises(ValueError, match="must be 2-D"):
        probes.matrix_spectrum(np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="must be 2-D"):
        probes.matrix_spectrum(np.ones(5))
    with pytest.raises(ValueError, match="NaN or Inf"):
        probes.matrix_spectrum(np.full((3, 3), np.nan))
