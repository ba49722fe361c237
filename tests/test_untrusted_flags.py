"""Rough edges of the training entry points' input: an unknown stage, two names for one parent."""

import shutil

import pytest
from conftest import make_test_config

from entropy_jax import train
from entropy_jax.checkpoint import CheckpointReadError
from entropy_jax.cli import apply_init_flags
from entropy_jax.config import RunConfig
from entropy_jax.errors import UserError


def test_unknown_stage_is_refused_listing_the_stages(tmp_path):
    with pytest.raises(UserError, match=r"stage='bogus' is not a known stage \(stages: pretrain, finetune, sft, "
                                        r"dpo, rlvr\)"):
        RunConfig.from_config(make_test_config(tmp_path, stage="bogus"))
    with pytest.raises(UserError, match="did you mean 'finetune'"):
        RunConfig.from_config(make_test_config(tmp_path, stage="fintune"))
    assert RunConfig.from_config(make_test_config(tmp_path, stage="sft")).stage == "sft"


def test_init_from_flag_and_config_key_must_agree(tmp_path):
    cfg = make_test_config(tmp_path, **{"init_from.workdir": str(tmp_path / "y")})
    with pytest.raises(UserError, match="name different parents: give one of them"):
        apply_init_flags(cfg, str(tmp_path / "x"), None)
    apply_init_flags(cfg, str(tmp_path / "x" / ".." / "y"), 3)  # the same folder, written another way
    assert (cfg.init_from.workdir, cfg.init_from.step) == (str(tmp_path / "x" / ".." / "y"), 3)
    with pytest.raises(UserError, match="--init_step=5 and --config.init_from.step=3 differ"):
        apply_init_flags(cfg, None, 5)


def test_truncated_parent_names_the_step_and_init_step(tiny_run, tmp_path, data_dir):
    cfg, run, _ = tiny_run
    parent = tmp_path / "parent"
    shutil.copytree(run, parent)
    last = cfg.train.steps
    for f in (parent / "checkpoints" / str(last) / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    stage = make_test_config(data_dir, **{"stage": "finetune", "init_from.workdir": str(parent),
                                          "init_from.step": last})
    with pytest.raises(CheckpointReadError) as e:
        train.train(stage, tmp_path / "ft")
    message = str(e.value)
    assert f"parent {parent} step {last} cannot be read" in message and "--init_step" in message, message
    assert len(message) < 400 and "\n" not in message, message
