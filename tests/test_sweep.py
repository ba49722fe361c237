"""The probe sweep over a real tiny run: completeness, resumability, parity with direct calls, sharding."""

import shutil
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, execute_notebook, kill_when_exists
from flax import nnx

from entropy_jax import probes
from entropy_jax.analysis import load_results
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.models import ModelConfig, Transformer, abstract_model
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import sweep
from entropy_jax.sweep.evaluators import make_evaluators, model_info
from entropy_jax.sweep.forward import probe_forward
from entropy_jax.workdir import Workdir

KEYS = ["run", "stage", "step", "probe", "layer", "head", "metric"]


def _copy(run, tmp_path, with_probes: bool = False):
    """A private copy of a run, under the same folder name (the table's ``run`` column)."""
    dst = tmp_path / run.name
    shutil.copytree(run, dst, ignore=None if with_probes else shutil.ignore_patterns("probes"))
    return dst


def _sorted(table: pd.DataFrame) -> pd.DataFrame:
    return table.sort_values(KEYS).reset_index(drop=True)


@pytest.fixture(scope="module")
def swept(tiny_run, tmp_path_factory):
    cfg, run, _ = tiny_run
    workdir = _copy(run, tmp_path_factory.mktemp("swept"))
    report = sweep(workdir)
    return cfg, workdir, report


def _expected(cfg, workdir):
    meta = Checkpoints(workdir, read_only=True).read_meta(cfg.train.steps)
    mcfg = ModelConfig(**meta["model_config"])
    info = model_info(abstract_model(mcfg, make_mesh())[1], mcfg.num_layers, mcfg.num_heads)
    return mcfg, set().union(*(e.expected_keys() for e in make_evaluators(cfg.probes.to_dict(), info).values()))


def test_one_row_per_checkpoint_probe_layer_head_metric(swept):
    cfg, workdir, report = swept
    table = load_results(workdir)
    steps = Checkpoints(workdir, read_only=True).all_steps()
    _, expected = _expected(cfg, workdir)
    assert report.probed_steps == steps and not report.skipped
    assert not table.duplicated(KEYS).any()
    for step in steps:
        rows = table[table.step == step]
        assert set(zip(rows.probe, rows.layer, rows["head"], rows.metric, strict=True)) == expected
        assert rows.ckpt_hash.nunique() == 1 and rows.tokens_seen.iloc[0] == step * 32 * 16
    assert len(table) == len(steps) * len(expected)
    assert (table.run == Workdir(workdir).run_id()).all() and (table.stage == "pretrain").all()
    assert np.isfinite(table[table.metric != "attention_entropy_bound_weights"].value).all()
    spectra = sorted(p.name for p in (workdir / "probes" / "spectra").glob("*.npz"))
    assert spectra == [f"step_{s:08d}.npz" for s in steps]


def test_second_sweep_adds_nothing_and_deleted_rows_come_back(swept, tmp_path):
    cfg, workdir, _ = swept
    again = sweep(workdir)
    assert again.rows_added == 0 and again.probed_steps == []
    work = _copy(workdir, tmp_path, with_probes=True)
    full = load_results(work)
    rng = np.random.default_rng(0)
    dropped = rng.choice(len(full), size=25, replace=False)
    full.drop(index=dropped).to_parquet(work / "probes" / "results.parquet", index=False)
    report = sweep(work)
    assert report.rows_added == 25
    assert sorted(report.probed_steps) == sorted(set(full.step.iloc[dropped]))
    pd.testing.assert_frame_equal(_sorted(load_results(work)), _sorted(full))


def test_sweep_values_equal_direct_probe_calls(swept):
    cfg, workdir, _ = swept
    table = load_results(workdir)
    step = cfg.train.steps
    mcfg, _ = _expected(cfg, workdir)
    _, target, model_state = abstract_model(mcfg, make_mesh())
    params = Checkpoints(workdir, read_only=True).restore(step, arrays={"params": target})["params"]
    model = nnx.merge(nnx.graphdef(Transformer(mcfg, rngs=nnx.Rngs(0))), params)
    tokens = np.load(workdir / "probes" / "probe_set.npz")["tokens"]
    _, inter = model(tokens, return_intermediates=True)
    value = lambda **k: table.query(" & ".join(f"{a} == {b!r}" for a, b in k.items()) + f" & step == {step}").value

    # The same representations the sweep saw (its sharded forward), then the probe functions directly.
    reps = probe_forward(nnx.graphdef(model), params, model_state, tokens, make_mesh(), cfg.probe_set.batch_size)
    last = np.asarray(reps["last"][:, -1], np.float64)
    np.testing.assert_allclose(last, inter["residual"][-1][:, -1], rtol=1e-4, atol=1e-5)  # == eager forward
    direct = {"rankme": probes.rankme(last), "rankme_cov": probes.rankme_cov(last),
              "alpha_req": probes.alpha_req(last).alpha, "von_neumann_entropy": probes.von_neumann_entropy(last)}
    for metric, v in direct.items():
        np.testing.assert_allclose(value(probe="last_token", layer=mcfg.num_layers, metric=metric), float(v),
                                   rtol=1e-5, err_msg=metric)
    ent = probes.attention_entropy(inter["attention_logits"][0], causal=True)
    for head in range(mcfg.num_heads):
        np.testing.assert_allclose(value(probe="attention", layer=1, head=head, metric="attention_entropy"),
                                   float(ent["head"][head]), rtol=1e-4)
    spec = probes.weight_spectra(nnx.to_pure_dict(params))["blocks/0/attn/query/kernel"]
    np.testing.assert_allclose(value(probe="weights", metric="blocks/0/attn/query/kernel/condition_number"),
                               spec["condition_number"], rtol=1e-6)
    saved = np.load(workdir / "probes" / "spectra" / f"step_{step:08d}.npz")[f"last_token_layer{mcfg.num_layers}"]
    np.testing.assert_allclose(saved, probes.covariance_spectrum(last)[: len(saved)], rtol=1e-5, atol=1e-10)


def test_single_device_sweep_matches_sharded(swept, tmp_path):
    _, workdir, _ = swept
    assert jax.device_count() == 4
    single = _copy(workdir, tmp_path)
    sweep(single, mesh=make_mesh(1))
    a, b = _sorted(load_results(single)), _sorted(load_results(workdir))
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value, b.value, rtol=2e-4, atol=1e-6)


def _probe_cli(workdir):
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "probe.py"), f"--workdir={workdir}"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_corrupted_checkpoint_is_reported_and_skipped(swept, tmp_path):
    _, workdir, _ = swept
    work = _copy(workdir, tmp_path)
    victims = [p for p in (work / "checkpoints" / "8" / "params").rglob("*") if p.is_file() and p.stat().st_size]
    for p in victims:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    out, err = _probe_cli(work).communicate(timeout=300)
    assert "skipped step 8" in err, err[-3000:]
    table = load_results(work)
    assert 8 not in set(table.step) and set(table.step) == set(load_results(workdir).step) - {8}


def test_sigkilled_sweep_resumes_to_the_same_table(swept, tmp_path):
    _, workdir, _ = swept
    work = _copy(workdir, tmp_path)
    kill_when_exists(_probe_cli(work), work / "probes" / "results.parquet")
    partial = load_results(work)
    assert partial.step.nunique() < load_results(workdir).step.nunique(), "sweep finished before the kill"
    out, err = _probe_cli(work).communicate(timeout=300)
    a, b = _sorted(load_results(work)), _sorted(load_results(workdir))
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value, b.value, rtol=1e-6, atol=1e-9)


def test_notebook_runs_on_a_real_sweep(swept, monkeypatch):
    execute_notebook(swept[1], monkeypatch)
