"""Two-stage LAPACK routines that scipy does not wrap, from the OpenBLAS that scipy bundles.

LAPACK's two-stage tridiagonalisation (a BLAS3 band reduction, then bulge chasing) is about
2x faster than ``dsytrd`` on large matrices. Both routines fall back to scipy's wrappers where
the library or the symbol is absent, with identical results to rounding.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os

import numpy as np
import scipy
import scipy.linalg

_DOUBLE_P = ctypes.POINTER(ctypes.c_double)


@functools.cache
def _openblas() -> ctypes.CDLL | None:
    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "libscipy_openblas-*"))
    try:
        return ctypes.CDLL(libs[0])
    except (IndexError, OSError):
        return None


def _symbol(name: str):
    lib = _openblas()
    return getattr(lib, name, None) if lib is not None else None


# Below this size the one-stage ``dsyevd`` is faster than ``dsyevd_2stage`` (2-core CPU, idle:
# 12 against 35 ms at n = 512, 438 against 627 ms at 2,048; 4,227 against 3,524 ms at 4,096).
EIGVALSH_TWO_STAGE_MIN = 4096


def symmetric_eigvalsh_inplace(k: np.ndarray) -> np.ndarray:
    """Eigenvalues (ascending) of symmetric C-contiguous float64 ``k``, destroying ``k``, no copy.

    LAPACKE ``dsyevd_2stage`` from ``EIGVALSH_TWO_STAGE_MIN`` rows on when available, else
    ``scipy.linalg.eigh(driver="evd")``. ``k`` being symmetric, its row-major buffer is also its
    column-major one, so LAPACK works in place.
    """
    n = len(k)
    fn = _symbol("scipy_LAPACKE_dsyevd_2stage") if n >= EIGVALSH_TWO_STAGE_MIN else None
    if fn is not None and k.flags.c_contiguous and k.dtype == np.float64:
        matrix = np.ctypeslib.ndpointer(np.float64, flags="C_CONTIGUOUS")
        fn.argtypes = [ctypes.c_int, ctypes.c_char, ctypes.c_char, ctypes.c_int, matrix, ctypes.c_int, matrix]
        fn.restype = ctypes.c_int
        w = np.empty(n, np.float64)
        if fn(102, b"N", b"L", n, k, n, w) == 0:  # 102: LAPACK_COL_MAJOR
            return w
    return scipy.linalg.eigh(k.T, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evd")


def tridiagonalise_inplace(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal and off-diagonal of ``Q^T a Q`` (tridiagonal) for symmetric float64 ``a`` (destroyed).

    Fortran ``dsytrd_2stage`` (lower) when available, else ``dsytrd``. Neither reads ``a[0, 0]``
    while building its reflectors, so ``T[0, 0] = a[0, 0]`` and the rest of T does not depend on
    it: :func:`entropy_jax.probes.stats.paired_eigenvalues` relies on this.
    """
    n = len(a)
    fn = _symbol("scipy_dsytrd_2stage_")
    if fn is not None and a.flags.c_contiguous and a.dtype == np.float64 and n > 1:
        d, e, tau = np.empty(n), np.empty(n - 1), np.empty(n - 1)
        vect, uplo, size, info, query = (ctypes.c_char(b"N"), ctypes.c_char(b"L"), ctypes.c_int(n),
                                         ctypes.c_int(0), ctypes.c_int(-1))

        def call(hous: np.ndarray, lhous: ctypes.c_int, work: np.ndarray, lwork: ctypes.c_int) -> None:
            ptr = lambda x: x.ctypes.data_as(_DOUBLE_P)
            fn(ctypes.byref(vect), ctypes.byref(uplo), ctypes.byref(size), ptr(a), ctypes.byref(size), ptr(d),
               ptr(e), ptr(tau), ptr(hous), ctypes.byref(lhous), ptr(work), ctypes.byref(lwork), ctypes.byref(info),
               ctypes.c_size_t(1), ctypes.c_size_t(1))  # hidden Fortran lengths of VECT and UPLO

        fn.restype = None
        hous, work = np.empty(1), np.empty(1)
        call(hous, query, work, query)  # workspace query
        lhous, lwork = ctypes.c_int(int(hous[0])), ctypes.c_int(int(work[0]))
        call(np.empty(lhous.value), lhous, np.empty(lwork.value), lwork)
        if info.value == 0:
            return d, e
        raise np.linalg.LinAlgError(f"dsytrd_2stage failed with info={info.value}")
    lwork = int(scipy.linalg.lapack.dsytrd_lwork(n, lower=1)[0])
    # a is symmetric: a.T is the same matrix in Fortran order, so LAPACK needs no copy.
    _, d, e, _, info = scipy.linalg.lapack.dsytrd(a.T, lower=1, lwork=lwork, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"dsytrd failed with info={info}")
    return d, e
