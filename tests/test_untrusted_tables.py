"""A damaged results table is one line naming it and the fix, and stays untouched; plot.py sees
one run given twice through another path."""

import subprocess
import sys

import pytest
from conftest import REPO

from entropy_jax.sweep.table import DamagedTableError, ResultsTable, load_results
from entropy_jax.workdir import Workdir


def run_plot(*workdirs):
    """experiments/plot.py on ``workdirs`` in its own process (its absl flags are its own)."""
    return subprocess.run([sys.executable, "experiments/plot.py", *(f"--workdir={w}" for w in workdirs)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def _table(root):
    wd = Workdir(root)
    rows = [{"run": "r", "stage": "pretrain", "step": s, "tokens_seen": 10 * s, "ckpt_hash": "h", "probe": "p",
             "layer": 0, "head": -1, "metric": "rankme", "value": 1.5 + s, "note": ""} for s in range(4)]
    ResultsTable(wd).append(rows)
    return wd


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_results_table_is_one_line_and_left_untouched(damage, tmp_path, capsys):
    wd = _table(tmp_path / "run")
    raw = wd.results.read_bytes()
    wd.results.write_bytes(raw[: len(raw) // 2] if damage == "truncated" else b"not a parquet file\n" * 9)
    damaged = wd.results.read_bytes()
    for read in (load_results, lambda root: ResultsTable(Workdir(root))):  # plot.py's reader, probe.py's writer
        with pytest.raises(DamagedTableError, match="move it aside"):
            read(wd.root)
    out = run_plot(wd.root)
    err = out.stderr
    assert out.returncode == 2 and err.count("\n") == 1 and f"results table {wd.results} is damaged" in err, err
    assert "rerun experiments/probe.py, which recomputes it from the checkpoints" in err
    assert wd.results.read_bytes() == damaged


def test_plot_sees_one_workdir_through_two_paths(tmp_path, capsys):
    wd = _table(tmp_path / "a")
    (tmp_path / "b").mkdir()
    assert len(load_results(wd.root)) == 4
    out = run_plot(wd.root, tmp_path / "b" / ".." / "a")
    err = out.stderr
    assert out.returncode == 2 and "a --workdir is given twice" in err, err
