"""One workdir, one writer: interruptions, concurrent writers and edits never lose or mix data.

Each test is one failure found on an earlier main: two writers at once (real processes), Ctrl-C /
SIGTERM during training, a torn metrics line, a damaged probe set, a retrained or copied workdir,
an edited corpus, an altered parameter file and retention on resume.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, make_test_config, restore_params

from entropy_jax import analysis, train
from entropy_jax.analysis import load_results
from entropy_jax.checkpoint import CheckpointReadError, Checkpoints, ConfigMismatchError
from entropy_jax.errors import UserError
from entropy_jax.models import abstract_model, model_config
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import ResultsTable, sweep
from entropy_jax.sweep.probe_set import ProbeSetError
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.workdir import Workdir, WorkdirBusyError

# Holds a workdir's lock in a separate process until killed.
HOLDER = """import sys, time
from entropy_jax.workdir import Workdir
with Workdir(sys.argv[1]).lock("a test holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


def _cli(script, workdir, data_dir, *flags):
    cmd = [sys.executable, str(REPO / script), "--config=" + str(REPO / "experiments/configs/pretrain.py") + ":test",
           f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", "--config.data.download=False",
           "--config.train.probe_every=0", *flags]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _probes(cfg) -> ml_collections.ConfigDict:
    """A cheap probe config: RankMe / alpha-ReQ / entropy of the last token's representation."""
    return ml_collections.ConfigDict({"probe_set": cfg.probe_set.to_dict(),
                                      "probes": {"last_token": cfg.probes.last_token.to_dict()}})


def _steps(workdir):
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        return ckpts.all_steps()
    finally:
        ckpts.close()


def _signal_when_exists(proc, path, signum, timeout=300.0) -> float:
    """Send ``signum`` to ``proc`` once ``path`` exists (0: send nothing); returns the time."""
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)
    if signum:
        proc.send_signal(signum)
    return time.time()


@pytest.fixture(scope="module")
def swept(tiny_run, tmp_path_factory):
    """A copy of the tiny run with its checkpoints probed (last_token only)."""
    cfg, run, _ = tiny_run
    workdir = _copy(run, tmp_path_factory.mktemp("safety") / "swept")
    report = sweep(workdir, _probes(cfg))
    assert report.rows_added > 0 and not report.skipped
    return cfg, workdir


@pytest.fixture(scope="module")
def resumed(tiny_run, tmp_path_factory):
    """The tiny run cut back to step 40 with a torn last metrics line, resumed with max_to_keep=2."""
    cfg, run, _ = tiny_run
    workdir = _copy(run, tmp_path_factory.mktemp("safety") / "resumed")
    shutil.rmtree(workdir / "checkpoints" / str(cfg.train.steps))
    with (workdir / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "loss": 1.2')  # a writer killed mid-line
    before = _steps(workdir)
    result = train.train(make_test_config(cfg.data.data_dir, **{"checkpoint.max_to_keep": 2}), workdir)
    return cfg, run, workdir, before, result


# Two writers on one workdir; Ctrl-C and SIGTERM (real processes) ------------------------------------

@pytest.fixture(scope="module")
def interrupted(tiny_run, tmp_path_factory, data_dir):
    """pretrain.py stopped by SIGINT while saving its first checkpoint, rerun and stopped by SIGTERM
    after step 16, then rerun to the end; while that last run trains, this process tries to train
    and to probe the same workdir."""
    cfg, _, _ = tiny_run
    workdir = tmp_path_factory.mktemp("safety") / "interrupted"
    runs = {}
    proc = _cli("experiments/pretrain.py", workdir, data_dir)
    sent = _signal_when_exists(proc, workdir / "checkpoints", signal.SIGINT)  # the step-0 save has begun
    _, err = proc.communicate(timeout=300)
    runs["sigint"] = dict(code=proc.returncode, err=err, seconds=time.time() - sent, steps=_steps(workdir))

    proc = _cli("experiments/pretrain.py", workdir, data_dir)
    _signal_when_exists(proc, workdir / "checkpoints" / "16", signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    runs["sigterm"] = dict(code=proc.returncode, err=err,
                           step=max(r["step"] for r in read_metrics(workdir / "metrics.jsonl")))

    proc = _cli("experiments/pretrain.py", workdir, data_dir)
    _signal_when_exists(proc, Workdir(workdir).lock_holder_file, 0)  # signal 0: only waits for the lock
    refusals = []
    for attempt in (lambda: train.train(cfg, workdir), lambda: sweep(workdir, _probes(cfg))):
        try:
            attempt()
            refusals.append("not refused")
        except WorkdirBusyError as e:
            refusals.append(str(e))
    _, err = proc.communicate(timeout=300)
    runs["final"] = dict(code=proc.returncode, err=err, pid=proc.pid, refusals=refusals)
    return workdir, runs


def test_a_second_training_is_refused_naming_the_first(interrupted, tiny_run):
    _, reference, _ = tiny_run
    workdir, runs = interrupted
    final = runs["final"]
    assert final["code"] == 0, final["err"][-2000:]
    who = f"pid {final['pid']} on host {socket.gethostname()} (training since "
    assert [who in r for r in final["refusals"]] == [True, True], final["refusals"]
    assert "so training was refused" in final["refusals"][0]
    assert "so the probe sweep was refused" in final["refusals"][1]
    # The first run's log and checkpoints are whole and exactly the uninterrupted run's.
    rows, expected = read_metrics(workdir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in expected]
    assert _steps(workdir) == _steps(reference)


def test_ctrl_c_during_the_first_save_stops_cleanly_with_status_130(interrupted):
    _, runs = interrupted
    run = runs["sigint"]
    assert run["code"] == 130, run["err"][-2000:]
    assert "Traceback" not in run["err"] and "stopped: training stopped by SIGINT" in run["err"], run["err"][-2000:]
    assert run["seconds"] < 60, f"took {run['seconds']:.1f} s to stop"
    assert run["steps"] == [0]  # the pending save was finished, not torn


def test_sigterm_stops_cleanly_with_status_143_and_the_rerun_resumes_exactly(interrupted, tiny_run):
    cfg, reference, _ = tiny_run
    workdir, runs = interrupted
    run = runs["sigterm"]
    assert run["code"] == 143, run["err"][-2000:]
    assert "Traceback" not in run["err"] and "resumed from step 0" in run["err"], run["err"][-2000:]
    assert "stopped: training stopped by SIGTERM" in run["err"] and 16 <= run["step"] < cfg.train.steps
    assert "resumed from step" in runs["final"]["err"]
    for a, b in zip(jax.tree.leaves(restore_params(cfg, workdir, cfg.train.steps)),
                    jax.tree.leaves(restore_params(cfg, reference, cfg.train.steps)), strict=True):
        np.testing.assert_array_equal(a, b)


def test_every_writer_is_refused_while_another_process_holds_the_workdir(swept, tmp_path):
    cfg, run = swept
    workdir = _copy(run, tmp_path / "held")
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*")}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        probe = subprocess.Popen([sys.executable, str(REPO / "experiments/probe.py"), f"--workdir={workdir}"],
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        who = rf"pid {holder.pid} on host {re.escape(socket.gethostname())} \(a test holder since [-0-9T:+]+\)"
        with pytest.raises(WorkdirBusyError, match=who + ", so training was refused.*kill -INT"):
            train.train(cfg, workdir)
        with pytest.raises(WorkdirBusyError, match=who + ", so the probe sweep was refused"):
            sweep(workdir, _probes(cfg))
        with pytest.raises(WorkdirBusyError, match=who + ", so the analysis was refused"):
            analysis.analyse(workdir)
        with pytest.raises(WorkdirBusyError, match=who + ", so plotting was refused"):
            analysis.plot_all(workdir)
        _, err = probe.communicate(timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert probe.returncode not in (0, 1) and "Traceback" not in err and len(errors) == 1, err[-2000:]
    assert re.search(who + ", so the probe sweep was refused: wait for it to finish or stop it", errors[0])
    # Nothing was written but the killed holder's own files, and they lock nothing.
    after = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if not p.name.startswith(".lock")}
    assert after == before
    with Workdir(workdir).lock("a check"):
        assert f'"pid": {os.getpid()}' in Workdir(workdir).lock_holder_file.read_text()
    assert not Workdir(workdir).lock_file.exists() and not Workdir(workdir).lock_holder_file.exists()


def test_the_lock_is_reentrant_and_only_for_writers(tmp_path):
    wd = Workdir(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        with wd.lock("probing", create=False):
            pass
    with wd.lock("training"), wd.lock("in-training probes"):  # one process, one lock
        assert wd.lock_holder_file.exists()
        assert '"purpose": "training"' in wd.lock_holder_file.read_text()
    assert list(wd.root.iterdir()) == []  # released: nothing left behind
    with wd.lock("process 1 of 2", enabled=False):
        assert not wd.lock_holder_file.exists()


# A torn last line of metrics.jsonl -----------------------------------------------------------------

def test_torn_metrics_line_resumes_exactly(resumed):
    cfg, reference, workdir, _, result = resumed
    assert result.resumed_from == 40
    rows, expected = read_metrics(workdir / "metrics.jsonl"), read_metrics(reference / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in rows] == [(r["step"], r["loss"]) for r in expected]
    assert all(line.endswith("}") for line in (workdir / "metrics.jsonl").read_text().splitlines())


def test_torn_metrics_line_plots_and_a_bad_line_is_named(swept, tmp_path):
    _, run = swept
    workdir = _copy(run, tmp_path / "torn")
    metrics = workdir / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 81, "lo')
    report = analysis.analyse(workdir)
    assert report.plots and all(p.stat().st_size > 0 for p in report.plots)
    assert len(analysis.load_train_metrics(workdir)) == 80
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:3] + ["{oops"] + lines[3:]) + "\n")
    with pytest.raises(UserError, match=re.escape(f"{metrics}, line 4, is not valid JSON")):
        analysis.load_train_metrics(workdir)


# The probe set ---------------------------------------------------------------------------------------

def test_damaged_probe_set_is_named_and_rebuilt_when_deleted(swept, tmp_path):
    cfg, run = swept
    workdir = _copy(run, tmp_path / "damaged")
    path = Workdir(workdir).probe_set
    good = path.read_bytes()
    recorded = ResultsTable(Workdir(workdir)).probe_set_sha256
    assert recorded == str(np.load(path)["sha256"])
    for damaged in (good[: len(good) // 2], b"garbled" * 100):  # truncated; not an archive at all
        path.write_bytes(damaged)
        with pytest.raises(ProbeSetError, match=re.escape(f"the probe set {path} is damaged") + ".*delete it"):
            sweep(workdir, _probes(cfg))
    path.unlink()
    report = sweep(workdir, _probes(cfg))  # rebuilt from the corpus, checked against the table's record
    assert report.rows_added == 0 and report.probed_steps == []
    assert str(np.load(path)["sha256"]) == recorded
    assert not list(path.parent.glob(".*.tmp"))


# A copied or retrained workdir ---------------------------------------------------------------------

def test_copied_or_renamed_workdir_is_not_probed_again(swept, tmp_path):
    cfg, run = swept
    workdir = _copy(run, tmp_path / "renamed_copy")
    report = sweep(workdir, _probes(cfg))
    assert report.rows_added == 0 and report.probed_steps == [] and not report.recomputed
    assert set(load_results(workdir)["run"]) == {Workdir(run).run_id()}


def test_rows_of_a_retrained_model_are_recomputed(swept, tmp_path, data_dir):
    cfg, run = swept
    workdir = _copy(run, tmp_path / "retrained")
    old = load_results(workdir)
    shutil.rmtree(workdir / "checkpoints")
    train.train(make_test_config(data_dir, **{"model.d_model": 32, "train.steps": 2}), workdir)
    report = sweep(workdir, _probes(cfg))
    assert report.recomputed == [0, 1, 2] and report.probed_steps == [0, 1, 2]
    new = load_results(workdir)
    assert sorted(set(new["step"])) == [0, 1, 2]  # the old model's later steps are gone too
    assert sorted(int(p.stem[5:]) for p in Workdir(workdir).spectra.glob("step_*.npz")) == [0, 1, 2]
    ckpts = Checkpoints(workdir, read_only=True)
    for step in (0, 1, 2):
        assert set(new.loc[new["step"] == step, "ckpt_hash"]) == {ckpts.read_checksums(step)["params"][:16]}
    ckpts.close()
    assert not set(new["ckpt_hash"]) & set(old["ckpt_hash"])
    assert not new.duplicated(["run", "stage", "step", "probe", "layer", "head", "metric"]).any()


# An edited corpus --------------------------------------------------------------------------------------

def test_edited_text_corpus_is_refused_on_resume_and_never_mixes_probe_sets(tmp_path, data_dir):
    texts = tmp_path / "texts"
    texts.mkdir()
    rng = np.random.default_rng(0)
    words = np.array(["entropy", "rank", "spectrum", "token", "layer", "the", "of", "a", "loss"])
    (texts / "a.txt").write_text(" ".join(rng.choice(words, 3000)))
    cfg = make_test_config(tmp_path / "tfds", **{"data.name": "text_folder", "data.text_dir": str(texts),
                                                 "train.steps": 2})
    workdir = tmp_path / "text"
    train.train(cfg, workdir)
    assert sweep(workdir, _probes(cfg)).rows_added > 0
    text = (texts / "a.txt").read_text()
    (texts / "a.txt").write_text(text.replace("rank", "RANK"))  # same length, other bytes
    cfg.train.steps = 4
    with pytest.raises(ConfigMismatchError, match=r"different config or corpus: corpus\.config: 'folder-\w+' -> "
                                                  r"'folder-\w+'"):
        train.train(cfg, workdir)
    assert _steps(workdir) == [0, 1, 2]
    Workdir(workdir).probe_set.unlink()
    with pytest.raises(ProbeSetError, match="were computed on probe set sha256 .*the probe set changed"):
        sweep(workdir, _probes(cfg))
    assert not Workdir(workdir).probe_set.exists()


# An altered parameter file -------------------------------------------------------------------------

def test_altered_parameters_are_refused_on_restore_naming_the_step(tiny_run, tmp_path):
    cfg, run, _ = tiny_run
    workdir = _copy(run, tmp_path / "altered")
    shutil.rmtree(workdir / "checkpoints" / str(cfg.train.steps))
    # Rewrite step 40's parameters with one value changed (a NaN), in the same format: what a bit
    # flip on disk looks like to a reader, since the array store carries no checksum of its own.
    _, target, _ = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len), make_mesh())
    ckpts = Checkpoints(workdir, read_only=True)
    params = ckpts.restore(40, arrays={"params": target})["params"]
    ckpts.close()
    params = jax.tree.map(lambda x: x.at[0].set(np.nan) if x.ndim == 1 else x, params)
    path = workdir / "checkpoints" / "40" / "params"
    shutil.rmtree(path)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path, params)
    with pytest.raises(CheckpointReadError, match=r"checkpoint step 40 in .*: its params do not match the "
                                                  r"checksum saved with them"):
        train.train(cfg, workdir)
    assert _steps(workdir)[-1] == 40 and max(r["step"] for r in read_metrics(workdir / "metrics.jsonl")) == 80


# Retention on resume -----------------------------------------------------------------------------------

def test_retention_on_resume_keeps_the_checkpoints_of_the_earlier_run(resumed):
    cfg, _, workdir, before, result = resumed
    assert before == [0, 1, 2, 4, 8, 16, 40]
    assert result.checkpoint_steps == _steps(workdir) == [*before, cfg.train.steps]
