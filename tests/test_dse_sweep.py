"""DSE in the default sweep: its rows, their values against an independent float64 computation,
the exact/SLQ switch on the tiny run's LayerNorm outputs, degenerate inputs, and the plot."""

from __future__ import annotations

import shutil

import ml_collections
import numpy as np
import pytest
import scipy.spatial.distance
from conftest import make_test_config
from flax import nnx

from entropy_jax.analysis import load_results, plots
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.models import ModelConfig, Transformer, abstract_model
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import sweep
from entropy_jax.sweep.evaluators import Context, ModelInfo, Representation
from entropy_jax.sweep.forward import probe_forward

DSE_METRICS = {"dse_bits", "dse_sigma", "dse_n", "dse_bits_sigma10"}


def _official_dse(x: np.ndarray, sigma: float) -> float:
    """The official algorithm written out densely in float64 (t = 1)."""
    g = np.exp(-scipy.spatial.distance.squareform(scipy.spatial.distance.pdist(x, "sqeuclidean")) / (2 * sigma**2))
    deg = np.diag(1 / np.sum(g, axis=1) ** 0.5)
    lam = np.abs(np.linalg.eigvalsh(deg @ g @ deg))
    p = lam / lam.sum() + np.finfo(float).eps
    return float(-np.sum(p * np.log2(p)))


@pytest.fixture(scope="module")
def dse_swept(tiny_run, tmp_path_factory, data_dir):
    """A copy of the tiny run swept with the default representation probes only."""
    cfg, run, _ = tiny_run
    workdir = tmp_path_factory.mktemp("dse") / run.name
    shutil.copytree(run, workdir, ignore=shutil.ignore_patterns("probes"))
    probe_config = ml_collections.ConfigDict({"probe_set": cfg.probe_set.to_dict(), "probes": {
        name: cfg.probes[name].to_dict() for name in ("last_token", "mean_token")}})
    sweep(workdir, probe_config=probe_config)
    return cfg, workdir, load_results(workdir)


def _final_layer_reps(cfg, workdir):
    """The sweep's representations at the last checkpoint, and the eager forward's residuals."""
    meta = Checkpoints(workdir, read_only=True).read_meta(cfg.train.steps)
    mcfg = ModelConfig(**meta["model_config"])
    _, target, model_state = abstract_model(mcfg, make_mesh())
    params = Checkpoints(workdir, read_only=True).restore(cfg.train.steps, arrays={"params": target})["params"]
    model = nnx.merge(nnx.graphdef(Transformer(mcfg, rngs=nnx.Rngs(0))), params)
    tokens = np.load(workdir / "probes" / "probe_set.npz")["tokens"]
    reps = probe_forward(nnx.graphdef(model), params, model_state, tokens, make_mesh(), cfg.probe_set.batch_size)
    _, inter = model(tokens, return_intermediates=True)
    return mcfg, reps, np.asarray(inter["residual"][-1], np.float64)


def test_default_config_writes_dse_rows_for_every_checkpoint_probe_and_layer(dse_swept):
    cfg, workdir, table = dse_swept
    steps = Checkpoints(workdir, read_only=True).all_steps()
    layers = cfg.model.num_layers + 1
    for probe in ("last_token", "mean_token"):
        rows = table[(table.probe == probe) & table.metric.isin(DSE_METRICS)]
        assert set(rows.metric) == DSE_METRICS and len(rows) == len(steps) * layers * len(DSE_METRICS)
        assert (rows[rows.metric == "dse_n"].value == cfg.probe_set.num_sequences).all()  # 64 < 1024: all rows
        bits = rows[rows.metric.str.startswith("dse_bits")]
        assert ((bits.value > 0) & (bits.value <= np.log2(64))).all()
        assert (bits.note == "exact, N=64").all()
        assert (rows[rows.metric == "dse_sigma"].value > 0).all()


def test_dse_rows_equal_an_independent_float64_computation(dse_swept):
    cfg, workdir, table = dse_swept
    mcfg, reps, _ = _final_layer_reps(cfg, workdir)
    final = table[(table.step == cfg.train.steps) & (table.probe == "last_token")]
    value = lambda metric, layer: float(final[(final.metric == metric) & (final.layer == layer)].value.iloc[0])
    for layer in range(mcfg.num_layers + 1):
        x = np.asarray(reps["last"][:, layer], np.float64)
        sigma = float(np.median(scipy.spatial.distance.pdist(x)))
        np.testing.assert_allclose(value("dse_sigma", layer), sigma, rtol=1e-9)
        np.testing.assert_allclose(value("dse_bits", layer), _official_dse(x, sigma), rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(value("dse_bits_sigma10", layer), _official_dse(x, 10.0), rtol=1e-9, atol=1e-9)


def test_large_n_switches_to_the_estimate_and_records_it(dse_swept):
    # Every token's final LayerNorm output in the tiny run: 64 x 16 = 1,024 rows of width 16.
    cfg, workdir, _ = dse_swept
    _, _, residual = _final_layer_reps(cfg, workdir)
    x = residual.reshape(-1, residual.shape[-1])
    info = ModelInfo(num_layers=0, num_heads=1, weight_paths=())
    entry = dict(type="representation", position="last", dse_samples=1024, dse_exact_max=512)
    ctx = Context(forward={"last": x[:, None, :]}, params=None, mesh=make_mesh(), spectra={})
    rows = {key[3]: (v, note) for key, v, note in Representation("p", entry, info).run(ctx)}
    sigma = float(np.median(scipy.spatial.distance.pdist(x)))
    assert rows["dse_n"][0] == 1024 and rows["dse_sigma"][0] == pytest.approx(sigma, rel=1e-9)
    for metric, width in (("dse_bits", sigma), ("dse_bits_sigma10", 10.0)):
        value, note = rows[metric]
        stderr, halfgap = (float(note.split(" bits")[i].split()[-1]) for i in (0, 1))
        assert note.startswith("slq, N=1024: standard error"), note
        exact = _official_dse(x, width)
        assert abs(value - exact) <= 0.01 * exact and abs(value - exact) <= 3 * stderr + halfgap + 1e-4, (value, exact)


def test_collapsed_representations_give_limits_or_nan_with_a_note():
    info = ModelInfo(num_layers=0, num_heads=1, weight_paths=())
    evaluator = Representation("p", dict(type="representation"), info)
    rows = {m: (v, note) for m, v, note in evaluator.dse_rows(np.ones((40, 8)), None)}
    assert rows["dse_bits"][0] == 0.0 and "coincide" in rows["dse_bits"][1] and rows["dse_sigma"][0] == 0.0
    assert rows["dse_bits_sigma10"][0] == pytest.approx(0.0, abs=1e-9)  # K = 11^T / N: one eigenvalue
    mostly = np.ones((40, 8))
    mostly[:10] += np.arange(10)[:, None]
    rows = {m: (v, note) for m, v, note in evaluator.dse_rows(mostly, None)}
    assert np.isnan(rows["dse_bits"][0]) and "median pairwise distance is 0" in rows["dse_bits"][1]


def test_bad_dse_config_is_one_clear_error(data_dir):
    info = ModelInfo(num_layers=1, num_heads=1, weight_paths=())
    cfg = make_test_config(data_dir, **{"probes.last_token.dse_samples": -5})
    with pytest.raises(ValueError, match=r"probes.last_token.dse_samples=-5 must be an integer >= 2"):
        Representation("last_token", cfg.probes.last_token.to_dict(), info).expected_keys()
    off = Representation("q", dict(type="representation", dse_samples=0), info)
    assert not {k[3] for k in off.expected_keys()} & DSE_METRICS


def test_dse_plot_shows_every_layer_and_the_table_values(dse_swept, tmp_path):
    cfg, _, table = dse_swept
    fig = plots.make_dse_figure(table, probe="last_token")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_ylabel() for ax in axes] == [plots.DSE_PANELS[m] for m in ("dse_bits", "dse_bits_sigma10",
                                                                               "dse_sigma")]
    assert all(len(ax.lines) == cfg.model.num_layers + 1 for ax in axes)
    rows = table[(table.probe == "last_token") & (table.metric == "dse_bits") & (table.layer == 0)].sort_values("step")
    np.testing.assert_allclose(axes[0].lines[0].get_ydata(), rows.value)
    path = plots.plot_dse(table, tmp_path / "dse.png", probe="last_token")
    assert path.stat().st_size > 10_000
