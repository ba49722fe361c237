"""Fine-tuning stages end to end on the test preset: pretrain -> SFT -> DPO (-> RLVR), with lineage,
exact resume after SIGKILL, and the one-line errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pandas as pd
import pytest
from conftest import REPO, kill_when_exists, restore_params

from entropy_jax import train
from entropy_jax.analysis.lifecycle import analyse_lineage, lineage_results, lineage_workdirs
from entropy_jax.checkpoint import Checkpoints, read_meta
from entropy_jax.errors import UserError
from entropy_jax.sweep import sweep
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.train.reference import init_checkpoint, prepare_stage
from entropy_jax.workdir import Workdir
from experiments.configs import dpo, rlvr, sft

STAGE_CONFIGS = {"sft": sft, "dpo": dpo, "rlvr": rlvr}


def stage_config(stage, data_dir, parent=None, **overrides):
    """``experiments/configs/<stage>.py:test`` with its data under ``data_dir``, started from ``parent``."""
    cfg = STAGE_CONFIGS[stage].get_config("test")
    cfg.data.data_dir = str(data_dir)
    if parent is not None:
        cfg.init_from.workdir = str(parent)
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = cfg
        for part in path:
            node = node[part]
        node[last] = value
    return cfg


def run_stage(stage, data_dir, parent, workdir, **overrides):
    cfg = stage_config(stage, data_dir, parent, **overrides)
    prepare_stage(cfg, workdir)
    return cfg, train.train(cfg, workdir)


def training_rows(workdir):
    """metrics.jsonl rows of training steps (a stage's step-0 row holds only its held-out evaluation)."""
    return [r for r in read_metrics(workdir / "metrics.jsonl") if "loss" in r]


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def chain(tiny_run, tmp_path_factory, data_dir):
    """The test-preset pretraining run, then SFT from its last checkpoint, DPO from SFT's, RLVR from DPO's."""
    root = tmp_path_factory.mktemp("lifecycle")
    pre = root / "pretrain"
    shutil.copytree(tiny_run[1], pre)  # the shared run stays read-only: this lineage gets probed
    workdirs = {"pretrain": pre}
    configs = {}
    for stage, parent in (("sft", pre), ("dpo", root / "sft"), ("rlvr", root / "dpo")):
        configs[stage], _ = run_stage(stage, data_dir, parent, root / stage)
        workdirs[stage] = root / stage
    return workdirs, configs


def test_sft_lowers_the_answer_loss_with_lineage(chain, tiny_run):
    workdirs, configs = chain
    pre_cfg, pre = tiny_run[0], workdirs["pretrain"]
    rows = training_rows(workdirs["sft"])
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.05, losses
    assert {r["loss_tokens"] for r in rows} == {configs["sft"].train.batch_size}  # one answer token per example
    parent_meta = read_meta(pre, pre_cfg.train.steps)
    tokens_per_step = configs["sft"].train.batch_size * configs["sft"].train.seq_len
    for step in Checkpoints(workdirs["sft"], read_only=True).all_steps():
        meta = read_meta(workdirs["sft"], step)
        assert meta["stage"] == "sft" and meta["run_id"] == Workdir(workdirs["sft"]).run_id()
        assert meta["parent"] == {"run_id": parent_meta["run_id"], "workdir": str(pre), "step": pre_cfg.train.steps,
                                  "stage": "pretrain"}
        assert meta["tokens_seen"] == parent_meta["tokens_seen"] + step * tokens_per_step
        assert meta["probe_source"]["data"] == parent_meta["config"]["data"]  # the root's probe sequences
    assert_trees_equal(restore_params(configs["sft"], workdirs["sft"], 0),
                       restore_params(pre_cfg, pre, pre_cfg.train.steps))


def test_dpo_starts_at_ln2_and_its_margin_and_accuracy_rise(chain):
    workdirs, configs = chain
    rows = training_rows(workdirs["dpo"])
    assert rows[0]["step"] == 1 and abs(rows[0]["loss"] - np.log(2)) < 1e-6  # policy = reference at step 0
    assert rows[0]["reward_margin"] == 0.0
    early, late = rows[:5], rows[-5:]
    assert np.mean([r["reward_margin"] for r in late]) > np.mean([r["reward_margin"] for r in early]) + 0.02
    assert np.mean([r["reward_accuracy"] for r in late]) > 0.6
    sft_steps = configs["sft"].train.steps
    assert configs["dpo"].train.loss.reference_workdir == str(workdirs["sft"])
    assert configs["dpo"].train.loss.reference_step == sft_steps
    # Resumed without --init_from, the stage finds its reference in its own lineage.
    again = stage_config("dpo", configs["dpo"].data.data_dir)
    assert init_checkpoint(again, workdirs["dpo"]) == (str(workdirs["sft"]), sft_steps)


def test_rlvr_reward_rises_on_a_task_the_model_partly_solves(chain):
    workdirs, configs = chain
    rows = training_rows(workdirs["rlvr"])
    rewards = [r["reward_mean"] for r in rows]
    assert 0.05 < np.mean(rewards[:5]) < 0.5  # partly solved after SFT and DPO
    assert np.mean(rewards[-10:]) > np.mean(rewards[:5]) + 0.05, rewards
    assert rows[0]["kl"] == 0.0 and all(r["kl"] >= 0 for r in rows)  # starts at the reference
    assert {"pass_at_1", "clip_fraction", "reward_std"} <= set(rows[-1])
    assert read_meta(workdirs["rlvr"], configs["rlvr"].train.steps)["stage"] == "rlvr"


def test_stage_without_a_checkpoint_to_start_from_is_refused(tmp_path, data_dir):
    with pytest.raises(UserError, match="stage 'sft' fine-tunes a checkpoint: give --init_from"):
        prepare_stage(stage_config("sft", data_dir), tmp_path / "sft")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints"):
        prepare_stage(stage_config("dpo", data_dir, tmp_path / "empty"), tmp_path / "dpo")
    assert not (tmp_path / "dpo").exists()


_KILLABLE = """
import logging, sys
logging.basicConfig(level=logging.INFO)
logging.getLogger("absl").setLevel(logging.WARNING)
sys.path[:0] = [{repo!r}, {tests!r}]
from test_posttrain_stages import run_stage
run_stage({stage!r}, {data_dir!r}, {parent!r}, {workdir!r})
"""


@pytest.mark.parametrize("stage,parent", [("sft", "pretrain"), ("dpo", "sft"), ("rlvr", "dpo")])
def test_stage_resumes_exactly_after_sigkill(chain, tmp_path, data_dir, stage, parent):
    workdirs, configs = chain
    workdir = tmp_path / stage
    code = _KILLABLE.format(repo=str(REPO), tests=str(REPO / "tests"), stage=stage, data_dir=str(data_dir),
                            parent=str(workdirs[parent]), workdir=str(workdir))
    log = tmp_path / "stage.log"  # a file, not a pipe: a full pipe would block the chatty child

    def run():
        with log.open("w") as f:
            return subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=f, stderr=subprocess.STDOUT)

    kill_when_exists(run(), workdir / "checkpoints" / "8")
    assert run().wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resumed from step 8" in log.read_text()
    resumed, uninterrupted = (read_metrics(w / "metrics.jsonl") for w in (workdir, workdirs[stage]))
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    for key in resumed[-1]:  # the stage's own metrics too (margin, accuracy, reward, KL)
        if key not in ("steps_per_sec", "tokens_per_sec"):  # wall-clock rates differ run to run
            assert [r.get(key) for r in resumed] == [r.get(key) for r in uninterrupted], key
    steps = configs[stage].train.steps
    assert_trees_equal(restore_params(configs[stage], workdir, steps),
                       restore_params(configs[stage], workdirs[stage], steps))


def lineage_probes(stage):
    """Probe config of the lineage tests: the root's sequences, and in fine-tuning stages also the
    held-out task prompts (the second probe view)."""
    probes = {"last_token": {"type": "representation", "position": "last"}}
    if stage != "pretrain":
        probes["task_last_token"] = {"type": "representation", "position": "last", "inputs": "task_prompts"}
    return ml_collections.ConfigDict({"probe_set": {"num_sequences": 64, "batch_size": 32}, "probes": probes})


def test_sweep_over_the_linked_workdirs_gives_one_table_in_stage_order(chain, tmp_path):
    workdirs, _ = chain
    order = ["pretrain", "sft", "dpo", "rlvr"]
    for stage in order:
        assert not sweep(workdirs[stage], lineage_probes(stage)).skipped
    assert lineage_workdirs(workdirs["rlvr"]) == [Path(workdirs[s]).absolute() for s in order]
    table, digest = lineage_results(lineage_workdirs(workdirs["rlvr"]))
    assert list(dict.fromkeys(table["stage"])) == order and table["tokens_seen"].is_monotonic_increasing
    assert len(table["run"].unique()) == 4 and len(digest) == 64
    report = analyse_lineage(workdirs["rlvr"])
    summary = pd.read_csv(report.summary_path)
    assert report.summary_path == workdirs["rlvr"] / "probes" / "stages.csv"
    assert list(dict.fromkeys(summary["stage"])) == order and set(summary["layer"]) == {0, 1}
    assert set(summary["probe"]) == {"last_token", "task_last_token"}
    # The task-prompt view: fine-tuning stages only, each stage
    # starting where its parent ended (the same parameters on the same held-out prompts).
    figures = summary.groupby("probe")["layer"].nunique()  # one per probe view and summary layer
    task = summary[summary["probe"] == "task_last_token"]
    assert list(dict.fromkeys(task["stage"])) == order[1:]
    for layer in (0, 1):
        rows = task[task["layer"] == layer].reset_index(drop=True)
        np.testing.assert_array_equal(rows["rankme_start"][1:], rows["rankme_end"][:-1])
    summary = summary[summary["probe"] == "last_token"]
    for layer in (0, 1):  # each stage starts where its parent ended: the same parameters, the same numbers
        rows = summary[summary["layer"] == layer].reset_index(drop=True)
        np.testing.assert_array_equal(rows["rankme_start"][1:], rows["rankme_end"][:-1])
        np.testing.assert_array_equal(rows["alpha_start"][1:], rows["alpha_end"][:-1])
        np.testing.assert_array_equal(rows["start_tokens"][1:], rows["end_tokens"][:-1])
    assert all(p.exists() for p in report.plots) and len(report.plots) == figures.sum() >= 3
    # The held-out task metrics per stage: first and last checkpoint of its metrics.jsonl; each stage
    # starts from its parent's last parameters on the same held-out prompts, so with the same numbers.
    stages = summary.drop_duplicates("stage").set_index("stage")
    assert stages.loc["pretrain", ["eval_accuracy_start", "eval_accuracy_end"]].isna().all()
    for stage in order[1:]:
        logged = [r for r in read_metrics(workdirs[stage] / "metrics.jsonl") if "eval_accuracy" in r]
        assert stages.loc[stage, "eval_accuracy_start"] == logged[0]["eval_accuracy"]
        assert stages.loc[stage, "eval_accuracy_end"] == logged[-1]["eval_accuracy"]
    np.testing.assert_array_equal(stages["eval_accuracy_start"][2:], stages["eval_accuracy_end"][1:-1])
    assert stages.loc["dpo", "eval_reward_accuracy_start"] == 0.0 and "pass_at_k_end" in stages.columns
    # A stage probed on other sequences is refused: its numbers would not be comparable.
    other = tmp_path / "other"
    shutil.copytree(workdirs["sft"], other)
    np.savez(Workdir(other).probe_set, tokens=np.zeros((1, 1)), sha256="0" * 64)
    with pytest.raises(UserError, match="different probe sets"):
        lineage_results([workdirs["pretrain"], other])


def _restored_model(cfg, workdir, step):
    """The model of checkpoint ``step`` of ``workdir`` (parameters and model state), on the host devices."""
    from flax import nnx

    from entropy_jax.models import abstract_model, model_config
    from entropy_jax.sharding import make_mesh

    graphdef, params, state = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len),
                                             make_mesh())
    with Checkpoints(workdir, read_only=True) as ckpts:
        r = ckpts.restore(step, arrays={"params": params, "model_state": state})
    return nnx.merge(graphdef, r["params"], r["model_state"])


def _held_out(cfg):
    """The stage's held-out examples, read straight from its task data (not through the evaluation)."""
    from entropy_jax.data import load_corpus

    val = load_corpus(cfg.data, cfg.train.seq_len).validation
    records = [val[i] for i in range(min(256, len(val)))]
    return {k: np.stack([np.asarray(r[k], np.int32) for r in records]) for k in ("prompt", "answer", "rejected")}


def _eval_rows(workdir):
    rows = {r["step"]: r for r in read_metrics(workdir / "metrics.jsonl")}
    steps = Checkpoints(workdir, read_only=True).all_steps()
    assert steps[0] == 0 and all(s in rows for s in steps), (steps, sorted(rows))
    return steps, rows


def test_task_prompt_view_is_the_spectrum_of_the_last_prompt_token(chain):
    """``task_last_token`` rows equal a float64 numpy RankMe of the final layer's representation at the
    last token of the held-out prompts; a run without a task refuses the entry in one line."""
    from entropy_jax.analysis.results import load_results

    workdirs, configs = chain
    cfg, workdir = configs["sft"], workdirs["sft"]
    sweep(workdir, lineage_probes("sft"))  # computes only what an earlier sweep left missing
    with pytest.raises(UserError, match="data.name='markov'.*has none"):
        sweep(workdirs["pretrain"], lineage_probes("sft"))
    steps = Checkpoints(workdir, read_only=True).all_steps()
    table = load_results(workdir)
    rows = table[(table["probe"] == "task_last_token") & (table["layer"] == 1)]
    assert sorted(rows["step"].unique()) == steps
    prompts = _held_out(cfg)["prompt"]
    assert len(prompts) == min(256, cfg.data.num_val)
    for step in (steps[0], steps[-1]):
        _, inter = _restored_model(cfg, workdir, step)(prompts, return_intermediates=True)
        x = np.asarray(inter["residual"][-1][:, -1], np.float64)  # after the final norm, last prompt token
        xc = x - x.mean(axis=0)
        ev = np.clip(np.linalg.eigvalsh(xc.T @ xc)[::-1], 0, None)
        q = ev / ev.sum() + 1e-7
        expected = np.exp(-(q * np.log(q)).sum())
        got = rows[(rows["step"] == step) & (rows["metric"] == "rankme_cov")]["value"].item()
        np.testing.assert_allclose(got, expected, rtol=1e-4)


def _log_softmax64(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def test_every_checkpoint_row_has_the_held_out_greedy_accuracy(chain):
    """eval_accuracy at each checkpoint = the checker's verdict on full-recomputation greedy answers."""
    from entropy_jax.data.tasks import check
    from entropy_jax.train.sampling import sample_recompute

    workdirs, configs = chain
    for stage in ("sft", "dpo", "rlvr"):
        cfg = configs[stage]
        ex = _held_out(cfg)
        steps, rows = _eval_rows(workdirs[stage])
        for step in steps:
            model = _restored_model(cfg, workdirs[stage], step)
            greedy = np.asarray(sample_recompute(model, ex["prompt"], ex["answer"].shape[1], jax.random.key(0), 0.0))
            expected = check(ex["prompt"], greedy, cfg.data.vocab_size).mean()
            assert rows[step]["eval_accuracy"] == pytest.approx(expected, abs=1e-7), (stage, step)
        assert "eval_accuracy_ood" not in rows[0]  # the add task has no out-of-distribution split
    first = read_metrics(workdirs["sft"] / "metrics.jsonl")[0]
    assert first["step"] == 0 and set(first) == {"step", "eval_accuracy", "tokens_seen"}  # the starting checkpoint


def test_dpo_rows_have_the_held_out_reward_accuracy(chain):
    """eval_reward_accuracy = share of held-out pairs whose implicit-reward margin against the
    reference (SFT's last checkpoint) is positive, recomputed in float64 from the logits."""
    from entropy_jax.data.tasks import sequences

    workdirs, configs = chain
    cfg = configs["dpo"]
    ex = _held_out(cfg)
    pairs = [sequences(ex["prompt"], ex[k], cfg.train.seq_len, cfg.data.vocab_size) for k in ("answer", "rejected")]
    reference = _restored_model(configs["sft"], workdirs["sft"], configs["sft"].train.steps)

    def logp(model, rows):
        lp = _log_softmax64(model(rows["inputs"]))
        return (np.take_along_axis(lp, rows["targets"][..., None], -1)[..., 0] * rows["weights"]).sum(-1)

    ref = [logp(reference, rows) for rows in pairs]
    steps, rows = _eval_rows(workdirs["dpo"])
    for step in steps:
        model = _restored_model(cfg, workdirs["dpo"], step)
        margin = (logp(model, pairs[0]) - ref[0]) - (logp(model, pairs[1]) - ref[1])
        near_zero = np.mean(np.abs(margin) < 1e-4)  # signs float32 arithmetic may decide either way
        assert abs(rows[step]["eval_reward_accuracy"] - np.mean(margin > 0)) <= near_zero + 1e-7, step
    assert rows[0]["eval_reward_accuracy"] == 0.0  # policy = reference: every margin is 0
    assert rows[steps[-1]]["eval_reward_accuracy"] > 0.5


def test_rlvr_rows_have_pass_at_k_and_the_sample_entropy(chain):
    """pass_at_k and sample_entropy at each checkpoint, recomputed from k = group_size answers drawn
    by full recomputation with the documented key, the checker, and float64 softmax entropies."""
    from entropy_jax.data.tasks import check
    from entropy_jax.train.sampling import sample_recompute

    workdirs, configs = chain
    cfg = configs["rlvr"]
    k, t = cfg.train.loss.group_size, cfg.train.loss.temperature
    ex = _held_out(cfg)
    n, a = ex["answer"].shape
    prompts = np.repeat(ex["prompt"], k, axis=0)
    steps, rows = _eval_rows(workdirs["rlvr"])
    for step in steps:
        model = _restored_model(cfg, workdirs["rlvr"], step)
        key = jax.random.fold_in(jax.random.key(cfg.seed), step)
        drawn = np.asarray(sample_recompute(model, prompts, a, key, t))
        passed = check(prompts, drawn, cfg.data.vocab_size).reshape(n, k).any(axis=1).mean()
        lp = _log_softmax64(np.asarray(model(np.concatenate([prompts, drawn], 1)))[:, -a - 1:-1] / t)
        entropy = -(np.exp(lp) * lp).sum(-1).mean()
        assert rows[step]["pass_at_k"] == pytest.approx(passed, abs=1e-7), step
        assert rows[step]["sample_entropy"] == pytest.approx(entropy, rel=1e-5), step
        assert rows[step]["pass_at_k"] >= rows[step]["eval_accuracy"] - 0.25  # k draws rarely all miss greedy's hits
