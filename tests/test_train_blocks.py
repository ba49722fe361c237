"""Several optimiser steps per jitted call (train.steps_per_call, a lax.scan): the same run as one step
per call, row for row and bit for bit, and an exact resume after SIGKILL inside a block."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, kill_when_exists, make_test_config

from entropy_jax import train
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.errors import UserError
from entropy_jax.models import abstract_model, model_config
from entropy_jax.sharding import make_mesh
from entropy_jax.train import loop
from entropy_jax.train.metric_writer import read_metrics

PER_CALL = 8
CLOCK = {"steps_per_sec", "tokens_per_sec"}  # wall-clock rates: never equal between two runs


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in read_metrics(workdir / "metrics.jsonl")]


def _checkpoints(cfg, workdir):
    """Every checkpoint's parameters, optimiser state and RNG, as host arrays, by step."""
    _, params, state = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len), make_mesh())
    with Checkpoints(workdir, read_only=True) as ckpts:
        return {s: jax.device_get(ckpts.restore(s, arrays={"params": params, "model_state": state}))
                for s in ckpts.all_steps()}


def _assert_same_run(cfg, workdir, reference):
    assert _rows(workdir) == _rows(reference)
    a, b = _checkpoints(cfg, workdir), _checkpoints(cfg, reference)
    assert sorted(a) == sorted(b)
    for step in a:
        for x, y in zip(jax.tree.leaves(a[step]), jax.tree.leaves(b[step]), strict=True):
            np.testing.assert_array_equal(x, y, err_msg=f"step {step}")


def test_blocks_of_steps_give_the_step_by_step_run(tiny_run, tmp_path, data_dir, monkeypatch):
    cfg, reference, _ = tiny_run
    blocked = make_test_config(data_dir, **{"train.steps_per_call": PER_CALL})
    calls = []
    make_block = loop.make_flat_train_block

    def counted(*args):
        block = make_block(*args)
        return lambda leaves, batches: calls.append(len(batches["inputs"])) or block(leaves, batches)

    monkeypatch.setattr(loop, "make_flat_train_block", counted)
    train.train(blocked, tmp_path / "blocked")
    # Blocks fill the gaps of 8 or more steps between checkpoints (8, 16, 40, 80): steps 9-80.
    assert calls == [PER_CALL] * ((cfg.train.steps - 8) // PER_CALL)
    _assert_same_run(cfg, tmp_path / "blocked", reference)


def test_sigkill_inside_a_block_resumes_exactly(tiny_run, tmp_path, data_dir):
    cfg, reference, _ = tiny_run
    workdir = tmp_path / "killed"
    cmd = [sys.executable, str(REPO / "experiments/pretrain.py"),
           f"--config={REPO / 'experiments/configs/pretrain.py'}:test", f"--workdir={workdir}",
           f"--config.data.data_dir={data_dir}", "--config.data.download=False",
           f"--config.train.steps_per_call={PER_CALL}"]
    run = lambda: subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kill_when_exists(run(), workdir / "checkpoints" / "16")  # the blocks after step 16 are in flight
    with Checkpoints(workdir, read_only=True) as ckpts:
        assert ckpts.latest_step() < cfg.train.steps
    out, err = run().communicate(timeout=300)
    assert "resumed from step" in err, err[-3000:]
    _assert_same_run(cfg, workdir, reference)


def test_steps_per_call_below_one_is_refused(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"train\.steps_per_call=0 must be >= 1"):
        train.train(make_test_config(data_dir, **{"train.steps_per_call": 0}), tmp_path / "x")
