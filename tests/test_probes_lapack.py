"""The two-stage LAPACK wrappers: same spectra as numpy, and the (0, 0) invariance paired_eigenvalues uses."""

import numpy as np
import pytest
import scipy.linalg

from entropy_jax.probes import lapack


def _sym(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, n))
    return a @ a.T


@pytest.mark.parametrize("n", [2, 7, 300])
def test_tridiagonalisation_keeps_the_spectrum(n):
    a = _sym(n, n)
    d, e = lapack.tridiagonalise_inplace(a.copy())
    ev = np.sort(scipy.linalg.eigvalsh_tridiagonal(d, e))
    np.testing.assert_allclose(ev, np.linalg.eigvalsh(a), rtol=1e-10, atol=1e-10 * np.abs(ev).max())


def test_entry_00_only_moves_t00():
    """Changing a[0, 0] by delta changes T[0, 0] by delta and nothing else."""
    a = _sym(300, 1)
    b = a.copy()
    b[0, 0] += 123.0
    (da, ea), (db, eb) = lapack.tridiagonalise_inplace(a.copy()), lapack.tridiagonalise_inplace(b.copy())
    assert db[0] - da[0] == pytest.approx(123.0, rel=1e-12)
    np.testing.assert_array_equal(da[1:], db[1:])
    np.testing.assert_array_equal(ea, eb)


def test_two_stage_path_matches_dsytrd(monkeypatch):
    """Both reductions fix e1 (Q e1 = e1), so by the implicit-Q theorem T agrees up to signs."""
    if lapack._symbol("scipy_dsytrd_2stage_") is None:
        pytest.skip("scipy's OpenBLAS does not export dsytrd_2stage here; the dsytrd fallback is tested above")
    a = _sym(300, 2)
    _, d_ref, e_ref, _, _ = scipy.linalg.lapack.dsytrd(a.copy(order="F"), lower=1)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the dsytrd fallback ran instead of dsytrd_2stage")

    monkeypatch.setattr(scipy.linalg.lapack, "dsytrd", no_fallback)
    d, e = lapack.tridiagonalise_inplace(a.copy())
    np.testing.assert_allclose(d, d_ref, rtol=1e-9, atol=1e-9 * np.abs(d_ref).max())
    np.testing.assert_allclose(np.abs(e), np.abs(e_ref), rtol=1e-9, atol=1e-9 * np.abs(e_ref).max())
