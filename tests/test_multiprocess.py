"""Two processes with two CPU devices each, on JAX's own distributed runtime over loopback (gloo).

The same command on every process, told apart only by ``JAX_PROCESS_ID``: training matches the
single-process 4-device run, survives a SIGKILL of one process (both restarted), and the sweep
writes the same table as a single-process sweep.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, kill_when_exists

from entropy_jax.sweep import load_results, sweep
from entropy_jax.train.metric_writer import read_metrics

pytestmark = pytest.mark.multiprocess
KEYS = ["run", "stage", "step", "probe", "layer", "head", "metric"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script: str, workdir, *flags: str) -> list[subprocess.Popen]:
    port = _free_port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, str(REPO / script), f"--workdir={workdir}", *flags],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float = 240) -> list[str]:
    errs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err[-3000:]
        errs.append(err)
    return errs


def _pretrain_flags(data_dir) -> list[str]:
    return [f"--config={REPO / 'experiments/configs/pretrain.py'}:test", f"--config.data.data_dir={data_dir}",
            "--config.data.download=False", "--config.train.probe_every=0"]


def _losses(workdir) -> list[float]:
    return [r["loss"] for r in read_metrics(workdir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory, data_dir):
    workdir = tmp_path_factory.mktemp("mp") / "run"
    _wait(_launch("experiments/pretrain.py", workdir, *_pretrain_flags(data_dir)))
    return workdir


def test_two_processes_train_like_one(two_process_run, tiny_run):
    _, reference, _ = tiny_run  # one process, four devices, same config
    np.testing.assert_allclose(_losses(two_process_run), _losses(reference), rtol=2e-6, atol=2e-6)
    assert sorted(p.name for p in (two_process_run / "checkpoints").iterdir()) == sorted(
        p.name for p in (reference / "checkpoints").iterdir())


def test_sigkill_of_one_process_then_restart_of_both_resumes_exactly(two_process_run, tmp_path, data_dir):
    workdir = tmp_path / "killed"
    procs = _launch("experiments/pretrain.py", workdir, *_pretrain_flags(data_dir))
    kill_when_exists(procs[1], workdir / "checkpoints" / "16")
    procs[0].send_signal(signal.SIGKILL)  # its peer is gone: it would wait for the heartbeat timeout
    procs[0].wait()
    assert len(_losses(workdir)) < 80, "the run finished before the kill: nothing was tested"
    errs = _wait(_launch("experiments/pretrain.py", workdir, *_pretrain_flags(data_dir)))
    assert "resumed from step" in errs[0], errs[0][-3000:]
    assert _losses(workdir) == _losses(two_process_run)


def test_two_process_sweep_writes_the_single_process_table(two_process_run, tmp_path):
    _wait(_launch("experiments/probe.py", two_process_run))
    single = tmp_path / two_process_run.name
    shutil.copytree(two_process_run, single, ignore=shutil.ignore_patterns("probes"))
    sweep(single)
    a = load_results(two_process_run).sort_values(KEYS).reset_index(drop=True)
    b = load_results(single).sort_values(KEYS).reset_index(drop=True)
    pd.testing.assert_frame_equal(a.drop(columns="value"), b.drop(columns="value"))
    np.testing.assert_allclose(a.value, b.value, rtol=2e-4, atol=1e-6, equal_nan=True)
