"""The jitted train step: sharded == single device, compiles once, learns a fixed batch."""

import jax
import numpy as np

from entropy_jax.models import ModelConfig, init_model
from entropy_jax.sharding import make_mesh, replicated, shard_batch
from entropy_jax.train.optim import decay_mask, make_optimizer, make_schedule
from entropy_jax.train.step import init_state, make_train_step
from experiments.configs.pretrain import get_config

MCFG = ModelConfig(vocab_size=32, d_model=16, num_layers=1, num_heads=2, max_len=12)


def _batch(seed: int = 0, b: int = 8) -> dict[str, np.ndarray]:
    tokens = np.random.default_rng(seed).integers(0, 32, (b, 13), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _run(num_devices: int, steps: int = 3):
    mesh = make_mesh(num_devices)
    tcfg = get_config("test").train
    tx, schedule = make_optimizer(tcfg), make_schedule(tcfg)
    graphdef, params, model_state = init_model(MCFG, seed=0)
    state = jax.device_put(init_state(params, model_state, tx, seed=0), replicated(mesh))
    step_fn = make_train_step(graphdef, tx, schedule)
    losses = []
    for s in range(steps):
        state, metrics = step_fn(state, shard_batch(_batch(s), mesh))
        losses.append(float(metrics["loss"]))
    return state, losses, step_fn


def test_sharded_step_matches_single_device():
    assert jax.device_count() >= 4, "conftest forces 4 CPU devices"
    s4, l4, _ = _run(4)
    s1, l1, _ = _run(1)
    np.testing.assert_allclose(l4, l1, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    batch_sharding = shard_batch(_batch(), make_mesh(4))["inputs"].sharding
    assert len(batch_sharding.device_set) == 4


def test_compiles_once_and_donates():
    state, _, step_fn = _run(4, steps=4)
    assert step_fn._cache_size() == 1, "the train step recompiled after its first call"
    assert int(state.step) == 4


def test_learns_a_fixed_batch():
    mesh = make_mesh()
    tcfg = get_config("test").train
    tx = make_optimizer(tcfg)
    graphdef, params, model_state = init_model(MCFG, seed=0)
    state = jax.device_put(init_state(params, model_state, tx, seed=0), replicated(mesh))
    step_fn = make_train_step(graphdef, tx, make_schedule(tcfg))
    batch = shard_batch(_batch(), mesh)
    losses = []
    for _ in range(31):
        state, m = step_fn(state, batch)
        losses.append(float(m["loss"]))
    assert losses[0] > np.log(32)  # random init is no better than uniform on random tokens
    assert losses[-1] < 0.5 * losses[0]


def test_weight_decay_only_on_matrices():
    _, params, _ = init_model(MCFG, seed=0)
    mask = decay_mask(params)
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
    assert all(m for k, m in flags.items() if "kernel" in k or "embedding" in k)
    assert not any(m for k, m in flags.items() if "bias" in k or "scale" in k)
