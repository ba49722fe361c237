"""Rough edges of the training entry points' input: an unknown stage, two names for one parent."""

import pytest
from conftest import make_test_config

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
