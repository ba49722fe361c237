"""A sweep over damaged or diverged checkpoints records why it skipped them and probes the rest."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from entropy_jax.checkpoint import Checkpoints
from entropy_jax.models import ModelConfig, abstract_model
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import load_results, sweep


def _copy(run, tmp_path):
    dst = tmp_path / run.name
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("probes"))
    return dst


def test_non_finite_parameters_are_recorded_and_skipped(tiny_run, tmp_path):
    cfg, run, _ = tiny_run
    work = _copy(run, tmp_path)
    last = cfg.train.steps
    ckpts = Checkpoints(work)
    meta = ckpts.read_meta(last)
    mcfg = ModelConfig.from_dict(meta["model_config"])
    _, target, model_state = abstract_model(mcfg, make_mesh())
    params = ckpts.restore(last, arrays={"params": target})["params"]
    pure = nnx.to_pure_dict(params)
    pure["final_norm"]["scale"] = jnp.full_like(pure["final_norm"]["scale"], jnp.nan)  # a diverged run
    nnx.replace_by_pure_dict(params, pure)
    ckpts.save(last + 1, arrays={"params": params}, json={"meta": {**meta, "step": last + 1}})
    ckpts.close()
    report = sweep(work)
    assert [s for s, _ in report.skipped] == [last + 1]
    assert "not finite" in report.skipped[0][1] and "final_norm" in report.skipped[0][1]
    table = load_results(work)
    assert last in set(table.step)
    diverged = table[table.step == last + 1]  # one row saying why, in place of the probes' rows
    assert list(diverged.metric) == ["non_finite_arrays"] and list(diverged.probe) == ["checkpoint"]
    assert list(diverged.value) == [1.0] and diverged.note.iloc[0] == report.skipped[0][1]
    assert [s for s, _ in sweep(work).skipped] == [last + 1] and len(load_results(work)) == len(table)  # no twin


def test_unreadable_newest_metadata_does_not_stop_the_sweep(tiny_run, tmp_path):
    cfg, run, _ = tiny_run
    work = _copy(run, tmp_path)
    last = cfg.train.steps
    (work / "checkpoints" / str(last) / "meta" / "metadata").write_text('{"step": 8')  # torn JSON
    report = sweep(work)
    assert [s for s, _ in report.skipped] == [last]
    steps = Checkpoints(work, read_only=True).all_steps()
    assert report.probed_steps == [s for s in steps if s != last]
    table = load_results(work)
    assert set(table.step) == set(steps) - {last}
    assert np.isfinite(table[table.metric == "rankme"].value).all()
    json.loads((run / "checkpoints" / str(last) / "meta" / "metadata").read_text())  # the original is intact
    assert jax.device_count() == 4


def test_attention_norm_option_reaches_the_forward_pass(tiny_run, tmp_path):
    """``norm="exact"`` in the probe entry gives exact-norm bound rows, noted so, at or above the
    certified ones (a smaller s gives a higher, tighter lower bound)."""
    cfg, run, _ = tiny_run
    rows = {}
    for norm in ("certified", "exact"):
        work = _copy(run, tmp_path / norm)
        probes = cfg.copy_and_resolve_references()
        probes.probes = {"attention": {"type": "attention", "num_examples": 8, "norm": norm}}
        sweep(work, probes)
        table = load_results(work)
        rows[norm] = table[table.metric.str.startswith("attention_entropy_bound_")].sort_values(
            ["step", "layer", "head", "metric"]).reset_index(drop=True)
    for norm, t in rows.items():
        assert set(t[t.metric != "attention_entropy_bound_row"].note) == {f"norm={norm}"}
    exact, certified = rows["exact"].value.to_numpy(), rows["certified"].value.to_numpy()
    assert np.all(exact >= certified - 1e-5)
    assert np.any(exact > certified + 1e-6)
