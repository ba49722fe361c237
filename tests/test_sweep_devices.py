"""The probe sweep from the command line with several CPU devices, on the demo's own configuration.

Its attention probe takes one spectral norm per (example, head) inside a program sharded over
the devices; batched LAPACK calls there used to deadlock XLA:CPU's thread pool (the sweep sat
idle in ``jax.device_get``). The test preset was too small to show it, so this runs the
``tiny`` preset's probes (1,024 sequences of 64 tokens, 128 in the attention probe).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from entropy_jax.analysis import load_results

TINY = f"--config={REPO / 'experiments/configs/pretrain.py'}:tiny"


def _run(script, *flags, devices: int, timeout: float):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.run([sys.executable, str(REPO / script), *flags], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("devices", [2])
def test_cli_sweep_with_several_devices_finishes(tmp_path, data_dir, devices):
    workdir = tmp_path / "tiny"
    train = _run("experiments/pretrain.py", TINY, f"--workdir={workdir}", "--config.train.steps=8",
                 "--config.data.num_train=4096", f"--config.data.data_dir={data_dir}", "--config.data.download=False",
                 devices=devices, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    # A hang is a timeout here (subprocess.run kills the child), not a stuck test run.
    probe = _run("experiments/probe.py", f"--workdir={workdir}", devices=devices, timeout=240)
    assert probe.returncode == 0, probe.stderr[-3000:]
    table = load_results(workdir)
    assert sorted(table.step.unique()) == [0, 1, 2, 4, 8]
    attention = table[(table.probe == "attention") & (table["head"] >= 0)].pivot_table(
        index=["step", "layer", "head"], columns="metric", values="value")
    assert len(attention) == 5 * 2 * 4  # steps x layers x heads
    # Theorem 3.1: every bound sits below the measured entropy, tighter s gives a higher bound.
    measured = attention["attention_entropy"]
    for name in ("row", "logits", "weights"):
        assert (attention[f"attention_entropy_bound_{name}"] <= measured + 1e-5).all(), name
    assert (attention["attention_entropy_bound_row"] >= attention["attention_entropy_bound_logits"] - 1e-5).all()
    assert np.isfinite(table.value).all()
