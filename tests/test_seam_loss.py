"""The loss seam: a loss defined outside the package (tests/dummy_loss.py), registered by its
decorator and chosen by ``train.loss.name``, is what a real training run minimises and logs."""

import subprocess
import sys

import dummy_loss  # registers train.loss.name = "param_l2")
import jax
import ml_collections
import numpy as np
import pytest
from conftest import REPO, make_test_config, restore_params

from entropy_jax import train
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.train.objective import LOSSES, make_loss, register_loss

COEF = 0.25  # not the factory's default: the run must pass the config's keyword through


def _sq_norm(params) -> float:
    """sum of squares of every parameter, in float64 on the host (independent of the loss's float32 sum)."""
    return float(sum(np.sum(np.square(np.asarray(p, np.float64))) for p in jax.tree.leaves(params)))


def test_a_loss_chosen_by_config_is_the_one_the_run_minimises_and_logs(tmp_path, data_dir):
    loss = ml_collections.ConfigDict({"name": "param_l2", "coef": COEF})
    cfg = make_test_config(data_dir, **{"train.loss": loss, "train.steps": 16, "train.probe_every": 0})
    workdir = tmp_path / "l2"
    train.train(cfg, workdir)
    rows = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, 17))
    assert {r["batch_tokens"] for r in rows.values()} == {cfg.train.batch_size * cfg.train.seq_len}
    with Checkpoints(workdir, read_only=True) as ckpts:
        saved = [s for s in ckpts.all_steps() if s + 1 in rows]
    assert len(saved) >= 4, saved
    for step in saved:  # row s + 1 is the loss at the parameters after s updates: checkpoint s
        sq = _sq_norm(restore_params(cfg, workdir, step))
        row = rows[step + 1]
        np.testing.assert_allclose(row["param_sq_norm"], sq, rtol=1e-5)
        np.testing.assert_allclose(row["loss"], 0.5 * COEF * sq, rtol=1e-5)
    # Minimising the norm shrinks it (next-token loss would not).
    assert rows[16]["param_sq_norm"] < 0.9 * rows[1]["param_sq_norm"]


def test_every_loss_is_registered_once_the_registry_is_importable():
    code = ("from entropy_jax.train.objective import LOSSES, make_loss; print(sorted(LOSSES)); "
            "make_loss({'name': 'grpo', 'group_size': 2})")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[0] == "['dpo', 'grpo', 'next_token']"


def test_a_name_registered_twice_is_refused_and_the_first_kept():
    with pytest.raises(ValueError, match=r"'param_l2' is registered twice: dummy_loss\.param_l2 and "):
        register_loss("param_l2")(lambda: None)
    assert LOSSES["param_l2"] is dummy_loss.param_l2


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"'nope' is not a known loss; choose one of \[.*'param_l2'.*\]"):
        make_loss({"name": "nope"})
