"""The one-command demo end to end (on the test preset): train, sweep, phases, plots, summary."""

import subprocess
import sys

from conftest import REPO


def test_run_py_trains_probes_and_plots(tmp_path, data_dir):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, str(REPO / "run.py"), f"--config={REPO / 'experiments/configs/pretrain.py'}:test",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.data.download=False"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert f"workdir: {workdir}" in out
    assert "checkpoints: 8 in" in out and "nats/token" in out
    assert str(workdir / "probes" / "results.parquet") in out and str(workdir / "probes" / "phases.csv") in out
    pngs = sorted(p.name for p in (workdir / "plots").glob("*.png"))
    assert {"attention_entropy_bound.png", "heatmap_rankme_last_token.png"} <= set(pngs)
    assert all(str(workdir / "plots" / p) in out for p in pngs)
    # A second run resumes everything: no training steps, no new rows.
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "(0 rows added this run)" in again.stdout
