"""Fine-tuning stages end to end on the test preset: pretrain -> SFT -> DPO (-> RLVR), with lineage,
exact resume after SIGKILL, and the one-line errors."""

import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, kill_when_exists
from flax import nnx

from entropy_jax import train
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.errors import UserError
from entropy_jax.models import abstract_model, model_config
from entropy_jax.sharding import make_mesh
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.train.reference import init_checkpoint, prepare_stage
from entropy_jax.workdir import Workdir


def stage_config(stage, data_dir, parent=None, **overrides):
    """``experiments/configs/<stage>.py:test`` with its data under ``data_dir``, started from ``parent``."""
    spec = importlib.util.spec_from_file_location(f"{stage}_cfg", REPO / "experiments" / "configs" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("test")
    cfg.data.data_dir = str(data_dir)
    if parent is not None:
        cfg.init_from.workdir = str(parent)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def run_stage(stage, data_dir, parent, workdir, **overrides):
    cfg = stage_config(stage, data_dir, parent, **overrides)
    prepare_stage(cfg, workdir)
    return cfg, train.train(cfg, workdir)


def restore_params(cfg, workdir, step):
    _, params, _ = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len), make_mesh())
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        return jax.device_get(nnx.to_pure_dict(ckpts.restore(step, arrays={"params": params})["params"]))
    finally:
        ckpts.close()


def read_meta(workdir, step):
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        return ckpts.read_meta(step)
    finally:
        ckpts.close()


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def chain(tiny_run, tmp_path_factory, data_dir):
    """The test-preset pretraining run, then SFT from its last checkpoint, then DPO from SFT's."""
    _, pre, _ = tiny_run
    root = tmp_path_factory.mktemp("lifecycle")
    workdirs = {"pretrain": pre}
    configs = {}
    for stage, parent in (("sft", pre), ("dpo", root / "sft")):
        configs[stage], _ = run_stage(stage, data_dir, parent, root / stage)
        workdirs[stage] = root / stage
    return workdirs, configs


def test_sft_lowers_the_answer_loss_with_lineage(chain, tiny_run):
    workdirs, configs = chain
    pre_cfg, pre, _ = tiny_run
    rows = read_metrics(workdirs["sft"] / "metrics.jsonl")
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert {r["loss_tokens"] for r in rows} == {configs["sft"].train.batch_size}  # one answer token per example
    parent_meta = read_meta(pre, pre_cfg.train.steps)
    tokens_per_step = configs["sft"].train.batch_size * configs["sft"].train.seq_len
    for step in Checkpoints(workdirs["sft"], read_only=True).all_steps():
        meta = read_meta(workdirs["sft"], step)
        assert meta["stage"] == "sft" and meta["run_id"] == Workdir(workdirs["sft"]).run_id()
        assert meta["parent"] == {"run_id": parent_meta["run_id"], "workdir": str(pre), "step": pre_cfg.train.steps,
                                  "stage": "pretrain"}
        assert meta["tokens_seen"] == parent_meta["tokens_seen"] + step * tokens_per_step
        assert meta["probe_source"]["data"] == parent_meta["config"]["data"]  # the root's probe sequences
    assert_trees_equal(restore_params(configs["sft"], workdirs["sft"], 0),
                       restore_params(pre_cfg, pre, pre_cfg.train.steps))


def test_dpo_starts_at_ln2_and_its_margin_and_accuracy_rise(chain):
    workdirs, configs = chain
    rows = read_metrics(workdirs["dpo"] / "metrics.jsonl")
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - np.log(2)) < 1e-6  # policy = reference at step 0
    assert rows[0]["reward_margin"] == 0.0
    early, late = rows[:5], rows[-5:]
    assert np.mean([r["reward_margin"] for r in late]) > np.mean([r["reward_margin"] for r in early]) + 0.02
    assert np.mean([r["reward_accuracy"] for r in late]) > 0.6
    sft_steps = configs["sft"].train.steps
    assert configs["dpo"].train.loss.reference_workdir == str(workdirs["sft"])
    assert configs["dpo"].train.loss.reference_step == sft_steps
    # Resumed without --init_from, the stage finds its reference in its own lineage.
    again = stage_config("dpo", configs["dpo"].data.data_dir)
    assert init_checkpoint(again, workdirs["dpo"]) == (str(workdirs["sft"]), sft_steps)


def test_stage_without_a_checkpoint_to_start_from_is_refused(tmp_path, data_dir):
    with pytest.raises(UserError, match="stage 'sft' fine-tunes a checkpoint: give --init_from"):
        prepare_stage(stage_config("sft", data_dir), tmp_path / "sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints"):
        prepare_stage(stage_config("dpo", data_dir, tmp_path / "empty"), tmp_path / "dpo")
    assert not (tmp_path / "dpo").exists()


_KILLABLE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
sys.path[:0] = [{repo!r}, {tests!r}]
from test_posttrain_stages import run_stage
run_stage({stage!r}, {data_dir!r}, {parent!r}, {workdir!r})
"""


def test_sft_resumes_exactly_after_sigkill(chain, tmp_path, data_dir):
    workdirs, configs = chain
    workdir = tmp_path / "sft"
    code = _KILLABLE.format(repo=str(REPO), tests=str(REPO / "tests"), stage="sft", data_dir=str(data_dir),
                            parent=str(workdirs["pretrain"]), workdir=str(workdir))
    run = lambda: subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
    kill_when_exists(run(), workdir / "checkpoints" / "8", timeout=600)
    out, err = run().communicate(timeout=300)
    assert "resumed from step" in err, err[-3000:]
    assert [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")] == [
        r["loss"] for r in read_metrics(workdirs["sft"] / "metrics.jsonl")]
    steps = configs["sft"].train.steps
    assert_trees_equal(restore_params(configs["sft"], workdir, steps),
                       restore_params(configs["sft"], workdirs["sft"], steps))
