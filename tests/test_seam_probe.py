"""The probe-type seam: a probe type added as one module and one registration (tests/dummy_probe.py)
is checked at config time by its own constructor and runs through a real sweep of a trained run."""

import shutil

import dummy_probe  # registers probe type "wo_norm"
import ml_collections
import numpy as np
import pytest
from conftest import make_test_config, restore_params

from entropy_jax import validate
from entropy_jax.checkpoint import saved_steps
from entropy_jax.errors import UserError
from entropy_jax.sweep import forward, load_results, sweep
from entropy_jax.sweep.probe_set import check_probe_workdir


def _probes(**entry) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"probes": {"wo": {"type": dummy_probe.KIND, **entry}}})


def test_a_registered_probe_type_runs_in_the_sweep(tiny_run, tmp_path, monkeypatch):
    cfg, run, _ = tiny_run
    work = tmp_path / run.name
    shutil.copytree(run, work, ignore=shutil.ignore_patterns("probes"))
    validate.check_config(make_test_config(cfg.data.data_dir, **{"probes.wo": {"type": "wo_norm", "power": 2.0}}))
    assert check_probe_workdir(str(work), _probes(power=2.0)) == work
    passes = []  # it reads the parameters only: no forward pass over the probe set runs
    for name in ("_representations", "_attention"):
        fn = getattr(forward, name)
        monkeypatch.setattr(forward, name, lambda *a, fn=fn, **k: passes.append(1) or fn(*a, **k))

    report = sweep(work, _probes(power=2.0))

    steps = saved_steps(work)
    table = load_results(work)
    assert report.probed_steps == steps and not report.skipped and not passes
    assert set(table.probe) == {"wo"} and set(table.metric) == {dummy_probe.METRIC}
    assert len(table) == len(steps) * cfg.model.num_layers and (table["head"] == -1).all()
    for step in steps:
        blocks = restore_params(cfg, work, step)["blocks"]
        for layer in range(cfg.model.num_layers):
            w_o = np.asarray(blocks[layer]["attn"]["out"]["kernel"], np.float64)
            row = table[(table.step == step) & (table.layer == layer + 1)]
            assert len(row) == 1
            np.testing.assert_allclose(row.value.iloc[0], np.sum(w_o * w_o), rtol=1e-12)
    first, last = (table[table.step == s].value.to_numpy() for s in (steps[0], steps[-1]))
    assert not np.allclose(first, last)  # training moved W_O: the rows follow the checkpoints


def test_a_bad_kwarg_is_refused_by_its_own_constructor_at_config_check(tiny_run, data_dir):
    _, run, _ = tiny_run
    message = r"^probes\.wo\.power=0 must be a number > 0$"
    with pytest.raises(UserError, match=message):
        validate.check_config(make_test_config(data_dir, **{"probes.wo": {"type": "wo_norm", "power": 0}}))
    with pytest.raises(UserError, match=message):
        check_probe_workdir(str(run), _probes(power=0))
    with pytest.raises(UserError, match=message):
        dummy_probe.OutputProjectionNorm("wo", {"power": 0})  # no model needed to check the kwargs
    with pytest.raises(UserError, match=r"probes\.wo\.type='wo_nrom' is not a probe type; did you mean 'wo_norm'"):
        validate.check_config(make_test_config(data_dir, **{"probes.wo": {"type": "wo_nrom"}}))
