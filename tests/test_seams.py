"""The seams: model state beside the parameters, a loss chosen by config, init-from a parent
checkpoint with lineage metadata, and probes that run inside training."""

import shutil
import subprocess
import sys

import counting_model  # noqa: F401  (registers model.arch = "counting_transformer")
import jax
import numpy as np
import optax
import pandas as pd
import pytest
from conftest import REPO, kill_when_exists, make_test_config
from flax import nnx

from entropy_jax import cli, train
from entropy_jax.checkpoint import Checkpoints, ConfigMismatchError
from entropy_jax.models import abstract_model, model_config
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import forward, load_results, sweep
from entropy_jax.train.losses import weighted_cross_entropy
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.workdir import Workdir

COUNTING = {"model.arch": "counting_transformer"}


def _restore(cfg, workdir, step):
    """Parameters and model state of checkpoint ``step``, as host pure dicts."""
    _, params, model_state = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len),
                                            make_mesh())
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        r = ckpts.restore(step, arrays={"params": params, "model_state": model_state})
    finally:
        ckpts.close()
    return jax.device_get(nnx.to_pure_dict(r["params"])), jax.device_get(nnx.to_pure_dict(r["model_state"]))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def counting_run(tmp_path_factory, data_dir):
    cfg = make_test_config(data_dir, **COUNTING)
    workdir = tmp_path_factory.mktemp("counting") / "run"
    train.train(cfg, workdir)
    return cfg, workdir


def test_model_state_is_trained_checkpointed_and_probed(counting_run):
    cfg, workdir = counting_run
    for step in (0, 16, cfg.train.steps):
        _, state = _restore(cfg, workdir, step)
        assert int(state["calls"]) == step  # one forward call per train step, none lost or repeated
    report = sweep(workdir)
    assert not report.skipped and report.probed_steps == Checkpoints(workdir, read_only=True).all_steps()
    table = load_results(workdir)
    assert np.isfinite(table[table.metric == "rankme"].value).all()


def test_model_state_resumes_exactly_after_sigkill(counting_run, tmp_path, data_dir):
    cfg, reference = counting_run
    workdir = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "tests" / "counting_model.py"),
           f"--config={REPO / 'experiments/configs/pretrain.py'}:test", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.data.download=False",
           "--config.model.arch=counting_transformer"]
    run = lambda: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when_exists(run(), workdir / "checkpoints" / "16")
    out, err = run().communicate(timeout=300)
    assert "resumed from step" in err, err[-3000:]
    assert [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(reference / "metrics.jsonl")]
    _assert_trees_equal(_restore(cfg, workdir, cfg.train.steps), _restore(cfg, reference, cfg.train.steps))


def test_weighted_cross_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits, targets = rng.normal(size=(3, 5, 7)), rng.integers(0, 7, (3, 5))
    weights = (rng.random((3, 5)) < 0.5).astype(np.float32)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    loss, total = weighted_cross_entropy(logits, targets, weights)
    np.testing.assert_allclose(loss, (ce * weights).sum() / weights.sum(), rtol=1e-5)
    assert float(total) == weights.sum()
    np.testing.assert_allclose(weighted_cross_entropy(logits, targets)[0], ce.mean(), rtol=1e-5)


def test_loss_chosen_by_config_trains_and_logs_its_aux(tmp_path, data_dir):
    cfg = make_test_config(data_dir, **{"train.loss.skip_first": 8, "train.steps": 30})
    result = train.train(cfg, tmp_path / "half")
    rows = read_metrics(tmp_path / "half" / "metrics.jsonl")
    assert {r["loss_tokens"] for r in rows} == {cfg.train.batch_size * (cfg.train.seq_len - 8)}
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0 and result.final_loss == rows[-1]["loss"]


def test_unknown_loss_is_refused_by_name(tmp_path, data_dir):
    with pytest.raises(ValueError, match="nope"):
        train.train(make_test_config(data_dir, **{"train.loss.name": "nope"}), tmp_path / "x")


def test_init_from_starts_at_the_parents_parameters_with_lineage(tiny_run, tmp_path, data_dir):
    parent_cfg, parent, _ = tiny_run
    child = tmp_path / "child"
    cfg = make_test_config(data_dir, **{"init_from.workdir": str(parent), "init_from.step": 16,
                                        "train.steps": 4, "stage": "finetune"})
    train.train(cfg, child)
    params, _ = _restore(cfg, child, 0)
    _assert_trees_equal(params, _restore(parent_cfg, parent, 16)[0])
    ckpts, parent_ckpts = Checkpoints(child, read_only=True), Checkpoints(parent, read_only=True)
    parent_meta = parent_ckpts.read_meta(16)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    for step in ckpts.all_steps():
        meta = ckpts.read_meta(step)
        assert meta["stage"] == "finetune" and meta["run_id"] == Workdir(child).run_id()
        assert meta["parent"] == {"run_id": parent_meta["run_id"], "workdir": str(parent), "step": 16,
                                  "stage": "pretrain"}
        assert meta["tokens_seen"] == parent_meta["tokens_seen"] + step * tokens_per_step
    assert meta["run_id"] != parent_meta["run_id"]
    # Fresh optimiser: the child's first update is the parent's step-1 update size, not step 17's.
    assert read_metrics(child / "metrics.jsonl")[0]["lr"] == 0.0


def test_init_from_refuses_a_different_model_and_writes_nothing(tiny_run, tmp_path, data_dir):
    _, parent, _ = tiny_run
    cfg = make_test_config(data_dir, **{"init_from.workdir": str(parent), "model.d_model": 32})
    with pytest.raises(ConfigMismatchError, match=r"d_model: 16 \(checkpoint\) vs 32"):
        train.train(cfg, tmp_path / "child")
    assert not (tmp_path / "child").exists() or not any((tmp_path / "child").iterdir())


def test_init_from_a_missing_step_is_refused(tiny_run, tmp_path, data_dir):
    _, parent, _ = tiny_run
    cfg = make_test_config(data_dir, **{"init_from.workdir": str(parent), "init_from.step": 3})
    with pytest.raises(FileNotFoundError, match="init_from.step=3"):
        train.train(cfg, tmp_path / "child")


def test_probes_during_training_equal_the_offline_sweep(tmp_path, data_dir, monkeypatch):
    cfg = make_test_config(data_dir, **{"train.steps": 16})
    workdir = tmp_path / "live"
    cli.train_with_probes(cfg, workdir)
    live = load_results(workdir)
    in_training = {n for n, e in cfg.probes.items() if e.get("in_training")}
    assert set(live.probe) == in_training == {"last_token", "mean_token", "output"}
    offline_dir = tmp_path / "offline" / workdir.name
    shutil.copytree(workdir, offline_dir, ignore=shutil.ignore_patterns("probes"))
    sweep(offline_dir)
    offline = load_results(offline_dir)
    keys = ["run", "stage", "step", "probe", "layer", "head", "metric"]
    a = live.sort_values(keys).reset_index(drop=True)
    b = offline[offline.probe.isin(in_training)].sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value, b.value, rtol=1e-6, atol=1e-9, equal_nan=True)
    # The sweep over the trained workdir computes only the offline probes (without the pass over
    # the whole probe set, which none of them reads), and the table equals the offline one.
    passes = []
    representations = forward._representations
    monkeypatch.setattr(forward, "_representations", lambda *args: passes.append(1) or representations(*args))
    report = sweep(workdir)
    assert report.rows_added == len(offline) - len(live) and not passes
    full = load_results(workdir).sort_values(keys).reset_index(drop=True)
    every = offline.sort_values(keys).reset_index(drop=True)
    assert set(full.probe) == set(cfg.probes)
    pd.testing.assert_frame_equal(full.drop(columns="value"), every.drop(columns="value"))
    np.testing.assert_allclose(full.value, every.value, rtol=1e-6, atol=1e-9, equal_nan=True)


def test_train_state_carries_rng_folded_per_step(tiny_run):
    cfg, workdir, _ = tiny_run
    ckpts = Checkpoints(workdir, read_only=True)
    key = {"key": jax.ShapeDtypeStruct((2,), np.uint32)}
    rngs = [ckpts.restore(s, arrays={"rng": key})["rng"]["key"] for s in (0, cfg.train.steps)]
    np.testing.assert_array_equal(rngs[0], jax.random.PRNGKey(cfg.seed))
    np.testing.assert_array_equal(rngs[0], rngs[1])  # the base key; steps fold their index in
    assert optax.tree.norm(jax.numpy.zeros(2)) == 0
