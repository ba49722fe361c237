"""Collapsed and degenerate inputs are findings, not crashes: limits, NaN with a reason, no errors.

Also the R^2 range of alpha-ReQ for 500 <= M < 512 and fully masked attention rows, each checked
against an independent float64 numpy computation or a closed form.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from entropy_jax import probes

RANKME_EPS = 1e-7


def _one_point_rankme(m: int) -> float:
    """RankMe's formula on the one-point distribution e_1 of m entries (numpy, float64)."""
    p = np.zeros(m)
    p[0] = 1.0
    p += RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def _collapsed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "zeros": np.zeros((200, 16)),
        "constant_rows": np.tile(rng.standard_normal(16) * 3.7 + 1.3, (200, 1)),
        "rank1": np.outer(rng.standard_normal(200), rng.standard_normal(16)),
        "rank1_wide": np.outer(rng.standard_normal(10), rng.standard_normal(40)),  # N < D
        "rank2": rng.standard_normal((200, 2)) @ rng.standard_normal((2, 16)),
    }


COLLAPSED = _collapsed()


@pytest.mark.parametrize("name", sorted(COLLAPSED))
def test_spectral_metrics_never_raises_on_collapse(name: str) -> None:
    x = COLLAPSED[name]
    for data in (x, x.astype(np.float32)):
        m = probes.spectral_metrics(data)
        assert isinstance(m["notes"], dict)
        for key in ("alpha_fit_start", "alpha_fit_stop", "numerical_rank"):
            assert type(m[key]) is int, key
        for key in ("rankme", "rankme_cov", "alpha_req", "alpha_req_r2", "alpha_req_r2_100", "alpha_req_r2_window",
                    "von_neumann_entropy", "von_neumann_entropy_uncentred"):
            assert type(m[key]) is float, key
        assert np.isnan(m["alpha_req"])  # rank <= 2: fewer than 3 usable eigenvalues
        assert "fewer than 3 eigenvalues above the numerical-rank threshold" in m["notes"]["alpha_req"]
        assert f"(rank {m['numerical_rank']})" in m["notes"]["alpha_req"]
        np.testing.assert_allclose(m["spectrum"].sum(), 1.0, rtol=1e-12)
        assert np.isfinite(m["spectrum"]).all()


@pytest.mark.parametrize("name", ["zeros", "constant_rows", "rank1", "rank1_wide"])
def test_rank_at_most_one_gives_the_limits(name: str) -> None:
    x = COLLAPSED[name]
    m_dim = min(x.shape)
    m = probes.spectral_metrics(x)
    limit = _one_point_rankme(m_dim)  # ~1: exp(H(e_1 + 1e-7))
    np.testing.assert_allclose(m["rankme_cov"], limit, rtol=1e-9)
    np.testing.assert_allclose(float(probes.rankme_cov(x)), limit, rtol=1e-9)
    assert abs(m["von_neumann_entropy"]) < 1e-12
    assert abs(float(probes.von_neumann_entropy(x))) < 1e-12
    assert m["numerical_rank"] <= 1
    assert {"rankme_cov", "von_neumann_entropy", "alpha_req"} <= set(m["notes"])
    fit = probes.alpha_req(x)  # the default window does not raise either
    assert all(np.isnan(float(v)) for v in fit)
    if name != "constant_rows":  # uncentred rank <= 1 too (constant rows are rank 1 uncentred as well)
        assert m["von_neumann_entropy_uncentred"] < 1e-12
    np.testing.assert_allclose(m["rankme"], limit, rtol=1e-6)  # sqrt of rounding eigenvalues: ~1e-8 each


def test_all_zero_data_is_the_one_point_limit_everywhere() -> None:
    x = COLLAPSED["zeros"]
    m = probes.spectral_metrics(x)
    limit = _one_point_rankme(16)
    assert m["rankme"] == pytest.approx(limit, rel=1e-12) and float(probes.rankme(x)) == pytest.approx(limit, rel=1e-12)
    assert m["von_neumann_entropy"] == 0.0 and m["von_neumann_entropy_uncentred"] == 0.0
    np.testing.assert_array_equal(m["spectrum"], np.eye(16)[0])
    np.testing.assert_array_equal(np.asarray(probes.covariance_spectrum(x)), np.eye(16)[0])
    assert m["numerical_rank"] == 0 and (m["alpha_fit_start"], m["alpha_fit_stop"]) == (0, 0)
    assert set(m["notes"]) == {"rankme", "rankme_cov", "von_neumann_entropy", "von_neumann_entropy_uncentred",
                               "alpha_req", "alpha_req_r2", "alpha_req_r2_100", "alpha_req_r2_window"}
    assert m["notes"]["rankme"].startswith("zero data")
    assert m["notes"]["rankme_cov"].startswith("zero centred covariance")
    with jax.enable_x64(True):  # the limits hold traced too
        assert float(jax.jit(probes.rankme)(jnp.asarray(x))) == pytest.approx(limit, rel=1e-12)
        assert float(jax.jit(probes.von_neumann_entropy)(jnp.asarray(x))) == 0.0
    assert float(jax.jit(probes.rankme_cov)(x.astype(np.float32))) == pytest.approx(limit, rel=1e-6)


def test_regular_data_have_no_notes_and_closed_forms() -> None:
    rng = np.random.default_rng(1)
    d, n = 16, 400
    q, _ = np.linalg.qr(rng.standard_normal((n, d)) - 0.0)
    q -= q.mean(0)
    q, _ = np.linalg.qr(q)  # centred orthonormal columns (mean stays 0): identity covariance
    m = probes.spectral_metrics(q)
    assert m["notes"] == {}
    np.testing.assert_allclose(m["von_neumann_entropy"], np.log(d), rtol=1e-10)
    np.testing.assert_allclose(m["rankme_cov"], d, rtol=1e-5)
    assert m["numerical_rank"] == d


def test_rank_three_is_the_smallest_fit_and_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((300, 3)) * [3.0, 1.0, 0.4]) @ np.linalg.qr(rng.standard_normal((16, 3)))[0].T
    m = probes.spectral_metrics(x)
    assert m["numerical_rank"] == 3 and (m["alpha_fit_start"], m["alpha_fit_stop"]) == (0, 3)
    xc = x - x.mean(0)
    ev = np.sort(np.linalg.eigvalsh(xc.T @ xc))[::-1][:3]
    r = np.arange(1, 4)
    a = np.stack([-np.log(r), np.ones(3)], 1) * np.sqrt(1.0 / r)[:, None]
    coef = np.linalg.lstsq(a, np.log(ev) * np.sqrt(1.0 / r), rcond=None)[0]
    np.testing.assert_allclose(m["alpha_req"], coef[0], rtol=1e-8)
    # R^2 ranges cut at the numerical rank 3: [1, 3) has two points, the rest is rounding.
    assert np.isfinite(m["alpha_req_r2"]) and np.isfinite(m["alpha_req_r2_window"])
    assert "alpha_req" not in m["notes"]


def test_explicit_window_past_the_numerical_rank_is_nan_with_a_note_not_an_error() -> None:
    x = COLLAPSED["zeros"]
    m = probes.spectral_metrics(x, alpha_fit_range=(0, 10))
    assert np.isnan(m["alpha_req"]) and "extends past the numerical rank 0" in m["notes"]["alpha_req"]
    with pytest.raises(ValueError, match="fit window"):  # a window outside the spectrum: configuration error
        probes.spectral_metrics(x, alpha_fit_range=(11, 100))
    with pytest.raises(ValueError, match="include zeros"):  # the public alpha_req still refuses
        probes.alpha_req(x, (0, 10))
    rng = np.random.default_rng(3)
    ln = rng.standard_normal((300, 12)) * np.arange(1, 13) ** -0.5
    ln -= ln.mean(axis=1, keepdims=True)
    m = probes.spectral_metrics(ln, alpha_fit_range=(0, 12))  # through the LayerNorm null direction
    assert np.isnan(m["alpha_req"]) and "extends past the numerical rank 11" in m["notes"]["alpha_req"]
    m = probes.spectral_metrics(ln, alpha_fit_range=(0, 11))  # inside the numerical rank: a regular fit
    assert "alpha_req" not in m["notes"]  # (its R^2 over [1, M - 10 = 2) is NaN, with its own note)
    assert m["alpha_req"] == pytest.approx(float(probes.alpha_req(ln, (0, 11)).alpha), rel=1e-12)


def test_non_finite_input_still_raises() -> None:
    x = COLLAPSED["rank1"].copy()
    x[0, 0] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        probes.spectral_metrics(x)


# --- alpha-ReQ R^2 range: 500 if M >= 512 else M - 10 (the original code) ---------------------------


def _stringer_get_powerlaw(ss: np.ndarray, start: int, stop: int) -> tuple[float, float, float]:
    """The original fastssl / Tracing ``stringer_get_powerlaw``, written out in numpy float64."""
    trange = np.arange(start, stop)
    logss = np.log(np.abs(ss))
    y = logss[trange][:, None]
    trange = trange + 1
    x = np.concatenate((-np.log(trange)[:, None], np.ones((trange.size, 1))), axis=1)
    w = 1.0 / trange.astype(np.float32)[:, None]
    b = np.linalg.solve(x.T @ (x * w), (w * x).T @ y).flatten()
    allrange = np.arange(ss.size) + 1
    pred = np.concatenate((-np.log(allrange)[:, None], np.ones((ss.size, 1))), axis=1) @ b

    def r2(lo: int, hi: int) -> float:
        yt, yp = logss[lo:hi], pred[lo:hi]
        return float(1 - np.sum((yt - yp) ** 2) / np.sum((yt - yt.mean()) ** 2))

    max_range = 500 if len(ss) >= 512 else len(ss) - 10
    return float(b[0]), r2(trange[0], max_range), r2(trange[0], 100)


@pytest.mark.parametrize("m", [499, 500, 505, 510, 511, 512, 600])
def test_r2_range_matches_the_original_code(m: int) -> None:
    rng = np.random.default_rng(m)
    ev = np.sort(np.arange(1, m + 1) ** -1.1 * np.exp(0.3 * rng.standard_normal(m)))[::-1]
    alpha, r2, r2_100 = _stringer_get_powerlaw(ev, 11, 100)
    for fit in (probes.alpha_req_from_spectrum(ev), probes.alpha_req_from_spectrum(ev, (11, 100))):
        np.testing.assert_allclose(float(fit.alpha), alpha, rtol=1e-10)
        np.testing.assert_allclose(float(fit.r2), r2, rtol=1e-10)
        np.testing.assert_allclose(float(fit.r2_100), r2_100, rtol=1e-10)
    if 500 <= m < 512 and m != 510:  # the old `500 if M >= 500` range [12, 500) gives another number
        fit = probes.alpha_req_from_spectrum(ev)
        pred = float(fit.intercept) - float(fit.alpha) * np.log(np.arange(1, m + 1))
        yt, yp = np.log(ev)[12:500], pred[12:500]
        old = 1 - np.sum((yt - yp) ** 2) / np.sum((yt - yt.mean()) ** 2)
        assert abs(old - float(fit.r2)) > 1e-6


def test_r2_range_through_alpha_req_on_data() -> None:
    rng = np.random.default_rng(4)
    d = 505
    x = rng.standard_normal((800, d)) * np.arange(1, d + 1) ** -0.6
    xc = x - x.mean(0)
    ev = np.sort(np.linalg.eigvalsh(xc.T @ xc))[::-1]
    alpha, r2, r2_100 = _stringer_get_powerlaw(ev, 11, 100)
    fit = probes.alpha_req(x)
    np.testing.assert_allclose([float(fit.alpha), float(fit.r2), float(fit.r2_100)], [alpha, r2, r2_100], rtol=1e-8)


# --- attention: rows with no visible key are NaN --------------------------------------------------


def test_fully_masked_rows_are_nan() -> None:
    rng = np.random.default_rng(5)
    z = rng.standard_normal((1, 2, 4, 6)) * 2
    mask = np.ones((1, 2, 4, 6), bool)
    mask[0, 0, 1] = False  # head 0, query 1: no visible key
    mask[0, 1] = False  # head 1: no visible key in any row
    row = np.asarray(probes.row_entropy(z, mask))
    assert np.isnan(row[0, 0, 1]) and np.isnan(row[0, 1]).all()
    with np.errstate(invalid="ignore"):  # scipy's softmax of an all -inf row is NaN too
        p = scipy.special.softmax(np.where(mask, z, -np.inf), axis=-1)
    ok = mask.any(-1)
    np.testing.assert_allclose(row[ok], scipy.stats.entropy(p, axis=-1)[ok], rtol=1e-6)
    out = probes.attention_entropy(z, mask)
    assert np.isnan(out["row"][0, 0, 1]) and np.isnan(out["head"][1]) and np.isnan(out["layer"])
    np.testing.assert_allclose(out["head"][0], np.mean(scipy.stats.entropy(p, axis=-1)[0, 0, [0, 2, 3]]), rtol=1e-6)
    assert np.isnan(probes.row_entropy(np.full((2, 3), -np.inf))).all()  # -inf logits: no key either
    assert float(probes.attention_entropy_lower_bound(1.0, 0)) != float(probes.attention_entropy_lower_bound(1.0, 0))
    assert float(probes.attention_entropy_lower_bound(1.0, 1)) == 0.0


def test_bounds_nan_for_rows_without_keys_and_blocked_agrees() -> None:
    rng = np.random.default_rng(6)
    z = rng.standard_normal((5, 5))
    mask = np.ones((5, 5), bool)
    mask[2] = False
    out = probes.attention_entropy_bounds(z, mask)
    for key in ("measured", "bound_row", "bound_logits"):
        assert np.isnan(out[key][2]) and np.isfinite(np.delete(np.asarray(out[key]), 2)).all(), key
    q = jnp.asarray(rng.standard_normal((1, 1, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 1, 4, 3)), jnp.float32)  # Tq > Tk causal: first two rows see nothing
    blocked = probes.attention_entropy_blocked(q, k, causal=True, key_block=2)
    dense = probes.attention_entropy(jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(3), causal=True)
    assert np.isnan(blocked["row"][..., :2]).all() and np.isnan(dense["row"][..., :2]).all()
    np.testing.assert_allclose(blocked["head"], dense["head"], rtol=1e-5)


@pytest.mark.parametrize("t, d", [(12, 5), (6, 20)])  # D < T (X^T X is the smaller Gram) and D > T
def test_bound_spectral_norms_match_numpy(t: int, d: int) -> None:
    rng = np.random.default_rng(7)
    dh = 4
    x, w_q, w_k = rng.standard_normal((t, d)), rng.standard_normal((d, dh)), rng.standard_normal((d, dh))
    logits = (x @ w_q) @ (x @ w_k).T
    with jax.enable_x64(True):
        out = jax.tree.map(np.asarray, probes.attention_entropy_bounds(logits, causal=True, w_q=w_q, w_k=w_k, x=x))
    assert set(out) == {"measured", "num_keys", "s_row", "s_logits", "s_weights",
                        "bound_row", "bound_logits", "bound_weights"}
    z_vis = np.where(np.tril(np.ones((t, t), bool)), logits, 0.0)
    np.testing.assert_allclose(out["s_row"], np.linalg.norm(z_vis, axis=1), rtol=1e-12)
    np.testing.assert_allclose(out["s_logits"], np.linalg.norm(z_vis, 2), rtol=1e-10)
    s_w = np.linalg.norm(w_k @ w_q.T, 2) * np.linalg.norm(x @ x.T, 2)
    np.testing.assert_allclose(out["s_weights"], s_w, rtol=1e-10)
    assert (out["measured"] >= out["bound_row"] - 1e-12).all()
    assert (out["bound_row"] >= out["bound_logits"] - 1e-12).all()
    assert (out["bound_logits"] >= out["bound_weights"] - 1e-12).all()


# --- other probe families on collapsed inputs -----------------------------------------------------


def test_matrix_spectrum_of_a_zero_matrix() -> None:
    spec = probes.matrix_spectrum(np.zeros((6, 4)))
    assert float(spec.spectral_norm) == 0.0 and float(spec.frobenius_norm) == 0.0
    assert np.isnan(float(spec.stable_rank)) and np.isnan(float(spec.condition_number))
    rank1 = probes.matrix_spectrum(np.outer(np.arange(1.0, 7.0), np.ones(4)))
    assert float(rank1.stable_rank) == pytest.approx(1.0, rel=1e-12)


def test_diffusion_on_constant_data_and_constant_labels() -> None:
    x = np.tile(np.arange(5.0), (40, 1))
    # Kernel of identical points: all ones; K has eigenvalues (1, 0, ..., 0): DSE of e_1 + eps.
    p = np.full(40, np.finfo(np.float64).eps)
    p[0] += 1.0
    np.testing.assert_allclose(probes.diffusion_spectral_entropy(x), -np.sum(p * np.log2(p)), rtol=1e-6, atol=1e-9)
    y = np.random.default_rng(8).standard_normal((40, 3))
    with np.errstate(invalid="raise", divide="raise"):  # constant continuous labels: one class, no information, no 0/0
        assert probes.diffusion_spectral_mutual_information(y, np.full(40, 0.5)) == pytest.approx(0.0, abs=1e-12)
