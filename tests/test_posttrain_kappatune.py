"""KappaTune: only the weight matrices of lowest condition number at the stage's start are trained."""

import jax
import numpy as np
from test_posttrain_stages import restore_params, run_stage

from entropy_jax.models import init_model, model_config
from entropy_jax.train.optim import condition_numbers, kappatune_mask


def _paths(tree):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_kappatune_selects_the_lowest_condition_numbers():
    _, params, _ = init_model(model_config(dict(d_model=16, num_layers=2, num_heads=2), 64, 16), 0)
    leaves = _paths(params)
    kappa = {k: np.linalg.cond(v.astype(np.float64)) for k, v in leaves.items() if v.ndim == 2}
    np.testing.assert_allclose([condition_numbers(params)[k] for k in kappa], list(kappa.values()), rtol=1e-9)
    mask = _paths(kappatune_mask(params, 4))
    assert {k for k, m in mask.items() if m} == set(sorted(kappa, key=kappa.get)[:4])


def test_kappatune_freezes_every_other_parameter_bit_identically(tiny_run, tmp_path, data_dir):
    workdir = tmp_path / "kappatune"
    cfg, _ = run_stage("sft", data_dir, tiny_run[1], workdir, **{"train.steps": 8, "train.kappatune": 2})
    start, end = restore_params(cfg, workdir, 0), restore_params(cfg, workdir, 8)
    chosen = {k for k, m in _paths(kappatune_mask(start, 2)).items() if m}
    start, end = _paths(start), _paths(end)
    assert len(chosen) == 2 and len(start) > 10
    for k in start:
        if k in chosen:
            assert not np.array_equal(start[k], end[k]), k
        else:
            np.testing.assert_array_equal(start[k], end[k], err_msg=k)
