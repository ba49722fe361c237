"""Training end to end: checkpoints, metrics, exact resume after SIGKILL, clear errors on bad input."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, kill_when_exists, make_test_config
from flax import nnx

from entropy_jax import train
from entropy_jax.checkpoint import Checkpoints, ConfigMismatchError, is_save_step
from entropy_jax.models import abstract_model, model_config
from entropy_jax.sharding import make_mesh
from entropy_jax.train.metric_writer import read_metrics


def _cli(script, workdir, data_dir, *flags, **popen):
    cmd = [sys.executable, str(REPO / script), "--config=" + str(REPO / "experiments/configs/pretrain.py") + ":test",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.data.download=False", *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _final_params(cfg, workdir, step):
    mesh = make_mesh()
    _, target, _ = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len), mesh)
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        return jax.device_get(nnx.to_pure_dict(ckpts.restore(step, arrays={"params": target})["params"]))
    finally:
        ckpts.close()


def test_log_spaced_schedule():
    saved = [s for s in range(3001) if is_save_step(s, 3000, dense_until=512, every=1000)]
    assert saved == [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 2000, 3000]


def test_run_writes_checkpoints_and_metrics(tiny_run):
    cfg, workdir, result = tiny_run
    expected = [s for s in range(cfg.train.steps + 1)
                if is_save_step(s, cfg.train.steps, cfg.checkpoint.dense_until, cfg.checkpoint.every)]
    assert result.checkpoint_steps == expected
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == expected
    rows = read_metrics(workdir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, cfg.train.steps + 1))
    losses = np.array([r["loss"] for r in rows])
    gap = losses - result.entropy_rate
    np.testing.assert_allclose([r["loss_minus_entropy_rate"] for r in rows], gap, rtol=1e-6)
    assert rows[-1]["tokens_seen"] == cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len
    # Learning: the initial gap (about ln 64 - 1.25 = 2.9 nats) closes to about 0.35 nats in the
    # 80 steps of the test preset; a model that learned little would stay above 0.6.
    assert losses[-5:].mean() < losses[:5].mean() - 1.5
    assert 0.0 < gap[-5:].mean() < 0.6
    meta = Checkpoints(workdir, read_only=True).read_meta(cfg.train.steps)
    assert meta["stage"] == "pretrain" and meta["step"] == cfg.train.steps
    assert meta["model_config"]["vocab_size"] == cfg.data.vocab_size


def test_exact_resume_after_sigkill(tmp_path, data_dir, tiny_run):
    """Kill -9 after a checkpoint, rerun the same command: same losses after the resume point, same params."""
    cfg, reference, _ = tiny_run
    workdir = tmp_path / "killed"
    kill_when_exists(_cli("experiments/pretrain.py", workdir, data_dir), workdir / "checkpoints" / "16")
    killed_at = max(r["step"] for r in read_metrics(workdir / "metrics.jsonl"))
    assert killed_at < cfg.train.steps, "the run finished before it was killed: nothing was tested"
    out, err = _cli("experiments/pretrain.py", workdir, data_dir).communicate(timeout=300)
    assert "resumed from step" in err, err[-2000:]
    resumed_rows, reference_rows = read_metrics(workdir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in reference_rows]
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in reference_rows]
    a, b = _final_params(cfg, workdir, cfg.train.steps), _final_params(cfg, reference, cfg.train.steps)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def test_incompatible_workdir_is_refused_untouched(tmp_path, data_dir, tiny_run):
    cfg, reference, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in reference.rglob("*")}
    with pytest.raises(ConfigMismatchError, match=r"model\.d_model: 16 -> 32"):
        train.train(make_test_config(data_dir, **{"model.d_model": 32}), reference)
    assert {p: p.stat().st_mtime_ns for p in reference.rglob("*")} == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir):
    workdir = tmp_path / "nan"
    cfg = make_test_config(data_dir, **{"train.lr": 1e30, "train.warmup_steps": 1, "train.grad_clip": 0.0})
    with pytest.raises(FloatingPointError, match=r"diverged at step (\d+).*last good checkpoint is step") as e:
        train.train(cfg, workdir)
    bad_step = int(e.value.args[0].split("diverged at step ")[1].split(":")[0])
    steps = Checkpoints(workdir, read_only=True).all_steps()
    assert steps and max(steps) < bad_step
    params = _final_params(cfg, workdir, max(steps))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_cli_errors_are_clear(tmp_path, data_dir):
    unknown = _cli("experiments/pretrain.py", tmp_path / "a", data_dir, "--config.train.stepz=3")
    _, err = unknown.communicate(timeout=120)
    assert unknown.returncode != 0 and "stepz" in err
    missing = _cli("experiments/pretrain.py", tmp_path / "b", data_dir, "--config.data.name=text_folder",
                   f"--config.data.text_dir={tmp_path / 'no_such_folder'}")
    _, err = missing.communicate(timeout=300)
    assert missing.returncode == 2 and "error:" in err and "no_such_folder" in err  # 2: bad input
    assert not (tmp_path / "b" / "checkpoints").exists()


def test_metrics_jsonl_is_one_json_object_per_line(tiny_run):
    _, workdir, _ = tiny_run
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert {"step", "loss", "grad_norm", "lr", "tokens_seen", "steps_per_sec"} <= set(row)
    assert os.path.getsize(workdir / "metrics.jsonl") > 0
