"""Regenerate the fixed float64 inputs behind the reference values in ``values.json``.

Run ``python tests/testdata/reference/make_inputs.py``: the ``.npy`` files are written next to
this script. Every array comes from one ``numpy.random.default_rng(0)`` stream, drawn in the
order below. Four files come out byte-identical to the committed ones; the power-law matrix goes
through a QR factorisation and a matrix product, so a different BLAS/LAPACK may change its last
bit (differences of about 1e-16, far below the tests' tolerances):

- ``X_gauss_500x32``: 500 rows of an isotropic standard Gaussian in 32 dimensions (flat spectrum).
- ``X_sub5_500x64``: 500 rows that live in a random 5-dimensional subspace of R^64, plus
  Gaussian noise of standard deviation 0.01 (five large eigenvalues, 59 tiny ones).
- ``X_cls_500x32`` with labels ``y_cls_500``: 10 classes of 50 rows in 32 dimensions; the class
  means are drawn from N(0, 9 I) and each row adds N(0, I) around its class mean (labels 0..9,
  int64, grouped by class).
- ``X_powerlaw1p2_2000x256``: 2000 rows in 256 dimensions whose population covariance has
  eigenvalues k^-1.2 (k = 1..256) in a random orthonormal basis, so alpha-ReQ should find 1.2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parent


def make_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x_gauss = rng.standard_normal((500, 32))
    z = rng.standard_normal((500, 5))
    a = rng.standard_normal((5, 64))
    x_sub = z @ a + 0.01 * rng.standard_normal((500, 64))
    means = 3.0 * rng.standard_normal((10, 32))
    y_cls = np.repeat(np.arange(10), 50).astype(np.int64)
    x_cls = means[y_cls] + rng.standard_normal((500, 32))
    d = 256
    lam = np.arange(1, d + 1) ** -1.2
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    x_pl = (rng.standard_normal((2000, d)) * np.sqrt(lam)) @ q.T
    return {
        "X_gauss_500x32": x_gauss,
        "X_sub5_500x64": x_sub,
        "X_cls_500x32": x_cls,
        "y_cls_500": y_cls,
        "X_powerlaw1p2_2000x256": x_pl,
    }


if __name__ == "__main__":
    for name, arr in make_inputs().items():
        np.save(OUT / f"{name}.npy", arr)
        print(name, arr.shape, arr.dtype)
