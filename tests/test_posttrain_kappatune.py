"""KappaTune: only the weight matrices of lowest condition number at the stage's start are trained."""

import jax
import numpy as np
from test_posttrain_stages import restore_params, run_stage

from entropy_jax.models import init_model, model_config
from entropy_jax.train.optim import KappaTuneMask, condition_numbers, kappatune_mask, make_optimizer


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


def _optimizer(kappatune: int):
    return make_optimizer({"steps": 10, "lr": 1e-2, "warmup_steps": 0, "grad_clip": 0.5, "kappatune": kappatune})


def test_kappatune_clips_over_the_trained_matrices_only_and_keeps_the_state_tree():
    _, params, _ = init_model(model_config(dict(d_model=16, num_layers=2, num_heads=2), 64, 16), 0)
    mask = kappatune_mask(params, 3)
    tx = _optimizer(3)
    state = tx.init(params)
    # A checkpoint of the optimiser state written as optax.chain(clip + AdamW, mask) restores into this one.
    old_form = (_optimizer(0).init(params), KappaTuneMask(jax.tree.map(np.asarray, mask)))
    assert jax.tree.structure(state) == jax.tree.structure(old_form)
    # Reference: clip + AdamW on the trained matrices alone, as if the frozen ones did not exist.
    trained = lambda tree: {k: v for k, v in _paths(tree).items() if _paths(mask)[k]}
    ref_tx = _optimizer(0)
    ref_params = trained(params)
    ref_state = ref_tx.init(ref_params)
    rng = np.random.default_rng(0)
    for scale in (3.0, 2.0, 1.0):
        grads = jax.tree.map(lambda p, s=scale: rng.standard_normal(p.shape).astype(np.float32) * s, params)
        updates, state = tx.update(grads, state, params)
        ref_updates, ref_state = ref_tx.update(trained(grads), ref_state, ref_params)
        got = _paths(updates)
        for k, expected in ref_updates.items():
            np.testing.assert_allclose(got[k], expected, rtol=1e-5, atol=1e-9, err_msg=k)
        assert all(not got[k].any() for k, m in _paths(mask).items() if not m)
