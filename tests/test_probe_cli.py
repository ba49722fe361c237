"""experiments/probe.py and plot.py over several workdirs, the probe set chosen at probe time
(an imported model's text), and the sweep with FSDP-sharded parameters."""

import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, make_test_config

from entropy_jax import train
from entropy_jax.analysis import load_results
from entropy_jax.analysis.lifecycle import given_lineage
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.errors import UserError
from entropy_jax.models import hf
from entropy_jax.sharding import make_mesh
from entropy_jax.sweep import sweep
from entropy_jax.sweep.probe_set import ProbeSetError, check_probe_overrides, check_probe_workdir
from entropy_jax.sweep.run import Prober
from entropy_jax.workdir import Workdir
from experiments import import_hf
from experiments.configs import probe

FIXTURES = REPO / "tests" / "testdata" / "hf"
TEXT = FIXTURES / "text"
KEYS = ["stage", "step", "probe", "layer", "head", "metric"]
PROBES = {"probe_set": {"num_sequences": 64, "batch_size": 32},
          "probes": {"last_token": {"type": "representation", "position": "last"},
                     "attention": {"type": "attention", "num_examples": 4}, "weights": {"type": "weights"}}}


def probe_config(probes=None, **probe_set):
    """experiments/configs/probe.py (every key None: the run's own) with ``probe_set`` keys set
    (and, given ``probes``, a probes section replacing the run's)."""
    cfg = probe.get_config()
    for key, value in probe_set.items():
        cfg.probe_set[key] = value
    if probes is not None:
        cfg.unlock()
        cfg.probes = probes
    return cfg


def _cli(script, *args):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               JAX_DISABLE_MOST_OPTIMIZATIONS="1")  # compilation dominates these tiny models
    return subprocess.run([sys.executable, str(REPO / "experiments" / script), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compilation dominates


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The GPT-NeoX and GPT-2 fixtures imported without probe text (step 0 each)."""
    root = tmp_path_factory.mktemp("hf")
    for name in ("gpt_neox", "gpt2"):
        import_hf.import_folders([str(FIXTURES / name)], root / name, step=0, seq_len=16, num_sequences=24,
                                 batch_size=8)
    return root / "gpt_neox", root / "gpt2"


def test_text_chosen_at_probe_time_is_the_models_tokenizer_over_it_and_is_kept(imported):
    neox, _ = imported
    with pytest.raises(UserError, match="needs text: set probe_set.text_dir"):
        check_probe_workdir(str(neox), probe_config())
    with pytest.raises(ProbeSetError, match="give probe_set.text_dir .* or probe_set.tfds_name .*, not both"):
        check_probe_workdir(str(neox), probe_config(text_dir=str(TEXT), tfds_name="wikitext"))
    with pytest.raises(ProbeSetError, match="probe_set.tfds_name='nosuchds' cannot be read from .*Dataset nosuchds "
                                            "not found.*give probe_set.text_dir"):
        check_probe_workdir(str(neox), probe_config(tfds_name="nosuchds", data_dir=str(neox)))
    with pytest.raises(ProbeSetError, match="probe_set.seq_len=65 is longer than the model's max_len=64"):
        check_probe_workdir(str(neox), probe_config(text_dir=str(TEXT), seq_len=65))
    assert not (neox / "probes" / "probe_set.npz").exists()

    report = sweep(neox, probe_config(PROBES["probes"], text_dir=str(TEXT)))
    assert report.probed_steps == [0] and report.rows_added > 0
    expected, digest = hf.probe_tokens(hf.probe_source(FIXTURES / "gpt_neox" / "tokenizer.json", 16, 24, 8,
                                                       text_dir=str(TEXT)))
    with np.load(Workdir(neox).probe_set) as saved:
        np.testing.assert_array_equal(saved["tokens"], expected)
        assert str(saved["sha256"]) == digest and json.loads(str(saved["overrides"])) == {"text_dir": str(TEXT)}
    # Later sweeps without the override keep the text chosen: nothing to recompute, nothing refused.
    assert check_probe_workdir(str(neox), probe_config()) == neox
    assert sweep(neox, probe_config(PROBES["probes"])).rows_added == 0
    before = Workdir(neox).probe_set.read_bytes()
    with pytest.raises(ProbeSetError, match=r"probe_set overrides \{'num_sequences': 20\} give probe set sha256 "
                                            r"\w+\.\.\., but .* was probed on \w+\.\.\. and a results table holds "
                                            "one probe set"):
        check_probe_workdir(str(neox), probe_config(num_sequences=20))
    assert Workdir(neox).probe_set.read_bytes() == before


def test_probe_cli_checks_every_workdir_then_sweeps_each_with_the_text_given(imported, tmp_path):
    neox, gpt2 = imported
    done = _cli("probe.py", f"--workdir={gpt2}", f"--workdir={tmp_path / 'nowhere'}",
                f"--config.probe_set.text_dir={TEXT}")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        f"error: --workdir={tmp_path / 'nowhere'} does not exist: give a run folder written by "
        "experiments/pretrain.py")
    assert not Workdir(gpt2).probe_set.exists() and not Workdir(gpt2).results.exists()
    done = _cli("probe.py", f"--workdir={neox}", f"--workdir={gpt2}", f"--config.probe_set.text_dir={TEXT}")
    assert done.returncode == 0, done.stderr[-3000:]
    for workdir in (neox, gpt2):
        assert f"rows to {workdir / 'probes' / 'results.parquet'}" in done.stdout
        assert set(load_results(workdir)["step"]) == {0}
    assert f"added {len(load_results(gpt2))} rows to {gpt2 / 'probes'}" in done.stdout
    tokens, _ = hf.probe_tokens(hf.probe_source(FIXTURES / "gpt2" / "tokenizer.json", 16, 24, 8, text_dir=str(TEXT)))
    np.testing.assert_array_equal(np.load(Workdir(gpt2).probe_set)["tokens"], tokens)


def test_text_overrides_are_refused_for_a_native_run(tiny_run):
    _, run, _ = tiny_run
    meta = Checkpoints(run, read_only=True).read_meta(0)
    with pytest.raises(ProbeSetError, match=r"probe_set.text_dir chooses the text of an imported model's probe set; "
                                            r"this run is probed on its own corpus \(data.name='markov'\)"):
        check_probe_overrides(meta, {"text_dir": str(TEXT)})
    with pytest.raises(ProbeSetError, match="probe_set.num_sequencs is not a probe-set key; did you mean "
                                            "'num_sequences'?"):
        check_probe_overrides(meta, {"num_sequencs": 3})


def _copy(run, dst, steps):
    """A copy of ``run`` holding only the checkpoints ``steps`` (and no probes)."""
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("probes", "plots"))
    for folder in (dst / "checkpoints").iterdir():
        if folder.is_dir() and folder.name.isdigit() and int(folder.name) not in steps:
            shutil.rmtree(folder)
    return dst


@pytest.fixture(scope="module")
def lineage(tiny_run, data_dir, tmp_path_factory):
    """A pretraining run (two of tiny_run's checkpoints) and a 2-step fine-tuning stage started from it, swept."""
    cfg, run, _ = tiny_run
    root = tmp_path_factory.mktemp("lineage")
    pre = _copy(run, root / "pre", {0, cfg.train.steps})
    child = root / "finetune"
    train.train(make_test_config(data_dir, **{"stage": "finetune", "init_from.workdir": str(pre),
                                              "train.steps": 2, "checkpoint.dense_until": 2}), child)
    for workdir in (pre, child):
        assert not sweep(workdir, ml_collections.ConfigDict(PROBES)).skipped
    return pre, child


def test_plot_cli_draws_each_workdir_and_the_lifecycle_of_a_lineage(lineage):
    pre, child = lineage
    done = _cli("plot.py", f"--workdir={pre}", f"--workdir={child}")
    assert done.returncode == 0, done.stderr[-3000:]
    for workdir in (pre, child):
        assert f"{workdir}:\nphases: {workdir / 'probes' / 'phases.csv'}" in done.stdout
        assert (workdir / "probes" / "phases.csv").exists()
    stages = pd.read_csv(child / "probes" / "stages.csv")
    assert list(dict.fromkeys(stages["stage"])) == ["pretrain", "finetune"]
    # The fine-tuning stage starts from the parent's last checkpoint: the same numbers at the seam.
    final = stages[stages["layer"] == stages["layer"].max()].reset_index(drop=True)
    assert final["rankme_start"][1] == final["rankme_end"][0] and final["start_tokens"][1] == final["end_tokens"][0]
    assert sorted(p.name for p in (child / "plots").glob("lifecycle_*.png")) == [
        "lifecycle_last_token_layer0.png", "lifecycle_last_token_layer1.png"]
    assert not list((pre / "plots").glob("lifecycle_*.png")) and not (pre / "probes" / "stages.csv").exists()


def test_workdirs_linked_out_of_order_are_refused_and_unrelated_ones_are_plotted_alone(lineage, imported):
    pre, child = lineage
    assert given_lineage([pre, child]) and not given_lineage([pre, imported[0]]) and not given_lineage([child])
    with pytest.raises(UserError, match=f"{pre} does not start from {child} \\(it records no parent: a run from"):
        given_lineage([child, pre])
    with pytest.raises(UserError, match=f"{imported[0]} does not start from {pre} \\(it records no parent"):
        given_lineage([pre, imported[0], child])  # a stage that is not the next one


def test_sharded_parameters_give_the_replicated_rows(lineage, tiny_run, tmp_path):
    cfg, run, _ = tiny_run
    pre, _ = lineage
    sharded = _copy(run, tmp_path / "pre", {0, cfg.train.steps})
    assert not sweep(sharded, ml_collections.ConfigDict(PROBES), shard_params=True).skipped
    a, b = (load_results(w).sort_values(KEYS).reset_index(drop=True) for w in (pre, sharded))
    pd.testing.assert_frame_equal(a[KEYS], b[KEYS])
    np.testing.assert_allclose(b["value"], a["value"], rtol=1e-5, atol=1e-6)
    assert (a["ckpt_hash"] == b["ckpt_hash"]).all() and len(a) > 50

    meta = Checkpoints(sharded, read_only=True).read_meta(0)
    prober = Prober(Workdir(sharded), meta, PROBES["probes"], PROBES["probe_set"], make_mesh(), shard_params=True)
    ckpts = Checkpoints(sharded, read_only=True)
    params = ckpts.restore(0, arrays={"params": prober.params_target})["params"]
    ckpts.close()
    leaves = jax.tree.leaves(params)
    for x in leaves:  # split over the 4 devices exactly when an axis divides (sharding.fsdp_spec)
        divisible = any(d % 4 == 0 for d in x.shape)
        assert (x.addressable_shards[0].data.size * 4 == x.size) == divisible, x.shape
    assert sum(x.addressable_shards[0].data.shape != x.shape for x in leaves) >= 3
