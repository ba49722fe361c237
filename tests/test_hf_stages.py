"""A published post-training lineage as stages: OLMo-2-shaped revisions (the tiny fixture) imported as
base -> SFT -> DPO -> Instruct, each a child stage of the one before (experiments/import_hf.py
--stage/--parent), probed on the root's sequences, summarised in probes/stages.csv and drawn on
one axis; revision names with tokens; every refusal before anything is written."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from safetensors.numpy import save_file

from entropy_jax.analysis import lifecycle, load_results
from entropy_jax.checkpoint import read_meta, saved_steps
from entropy_jax.cli import user_errors
from entropy_jax.models import hf
from entropy_jax.sweep import sweep
from experiments import import_hf

FIXTURES = REPO / "tests" / "testdata" / "hf"
SIZES = dict(seq_len=16, num_sequences=24, batch_size=8)
CHAIN = (("sft", "OLMo-2-SFT"), ("dpo", "OLMo-2-DPO"), ("rlvr", "OLMo-2-Instruct"))

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _revision(dst, seed, src=FIXTURES / "olmo2"):
    """A copy of a fixture whose weights moved by seeded noise (float32 on disk; seed 0: unchanged)."""
    shutil.copytree(src, dst)
    if seed:
        rng = np.random.default_rng(seed)
        tensors = {k: v + np.float32(0.05) * rng.standard_normal(v.shape, np.float32)
                   for k, v in hf.read_tensors(src).items()}
        save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmo2")
    base = [_revision(root / "revs" / "stage1-step1000-tokens4B", 0),
            _revision(root / "revs" / "stage1-step2000-tokens8B", 1)]
    import_hf.import_folders([str(p) for p in base], root / "base", text_dir=str(FIXTURES / "text"), **SIZES)
    parent, workdirs = root / "base", [root / "base"]
    for i, (stage, name) in enumerate(CHAIN):
        folder = _revision(root / "revs" / name, 2 + i)
        assert import_hf.import_folders([str(folder)], root / stage, stage=stage, parent=str(parent), **SIZES) == [0]
        parent = root / stage
        workdirs.append(parent)
    for w in workdirs:
        sweep(w)
    return workdirs


def test_each_stage_records_its_parent_and_continues_its_tokens(chain):
    metas = [read_meta(w, saved_steps(w)[-1]) for w in chain]
    base_steps = saved_steps(chain[0])
    assert base_steps == [1000, 2000]
    assert [read_meta(chain[0], s)["tokens_seen"] for s in base_steps] == [4 * 10**9, 8 * 10**9]
    assert metas[0]["source"]["tokens_per_step"] is None  # read from the revision names, no batch size guessed
    for (stage, _), workdir, parent, child in zip(CHAIN, chain, metas[:-1], metas[1:], strict=False):
        assert (child["stage"], child["step"], child["tokens_seen"], child["tokens_at_start"]) == (
            stage, 0, 8 * 10**9, 8 * 10**9)
        assert child["parent"] == {"run_id": parent["run_id"], "workdir": str(workdir),
                                   "step": parent["step"], "stage": parent["stage"]}
        assert child["probe_source"] == metas[0]["probe_source"]  # the root's sequences
    assert len({m["params_sha256"] for m in metas}) == 4


def test_the_chain_is_one_lineage_in_the_stage_table_and_figure(chain):
    assert lifecycle.lineage_workdirs(chain[-1]) == chain
    report = lifecycle.analyse_lineage(chain[-1])
    summary = pd.read_csv(chain[-1] / "probes" / "stages.csv")
    assert list(summary.drop_duplicates("stage").stage) == ["pretrain", "sft", "dpo", "rlvr"]
    assert report.plots and all(p.exists() for p in report.plots)
    assert (summary[summary.stage != "pretrain"].start_tokens == 8 * 10**9).all()
    first = summary[summary.stage == "pretrain"].iloc[0]
    assert (first.start_step, first.end_step) == (1000, 2000)
    assert summary.rankme_end.between(1, 16).all()


def test_probes_per_query_head_and_gate_up_down_spectra(chain):
    table = load_results(chain[1])
    attn = table[(table.probe == "attention") & (table.metric == "attention_entropy")]
    assert sorted(attn["head"].unique()) == [-1, 0, 1, 2, 3]  # 4 query heads over 2 key/value heads
    weights_bound = table[table.metric == "attention_entropy_bound_weights"]
    assert len(weights_bound) and weights_bound.value.isna().all()  # QK-norm and rotary: no bilinear form
    assert table[table.metric == "attention_entropy_bound_row"].value.notna().all()
    spectra = set(table[table.probe == "weights"].metric)
    for name in ("gate", "up", "down"):
        assert f"blocks/0/mlp/{name}/kernel/spectral_norm" in spectra
    assert "blocks/1/attn/query_norm/scale/spectral_norm" not in spectra  # vectors are no matrices


def _refused(capsys, fn, *args, **kwargs) -> str:
    with pytest.raises(SystemExit) as exit_, user_errors():
        fn(*args, **kwargs)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_stage_refusals_write_nothing(chain, tmp_path, capsys):
    llama = _revision(tmp_path / "Llama-SFT", 0, FIXTURES / "llama")
    sft = _revision(tmp_path / "OLMo-2-SFT", 0)
    cases = [
        ((llama,), dict(stage="sft", parent=str(chain[0])), "another model than --parent"),
        ((sft,), dict(stage="sft", parent=str(chain[0]), text_dir=str(FIXTURES / "text")), "lineage root's sequences"),
        ((sft,), dict(stage="sft"), "--parent and --stage go together"),
        ((sft,), dict(stage="sft", parent=str(tmp_path / "nowhere")), "holds no checkpoints"),
    ]
    for folders, kwargs, line in cases:
        workdir = tmp_path / "w"
        assert line in _refused(capsys, import_hf.import_folders, [str(f) for f in folders], workdir, **kwargs)
        assert not workdir.exists()


def test_tokens_per_step_is_never_pythias_for_another_family(tmp_path, capsys):
    folder = _revision(tmp_path / "revs" / "step100", 0, FIXTURES / "llama")
    err = _refused(capsys, import_hf.import_folders, [str(folder)], tmp_path / "w", text_dir=str(FIXTURES / "text"),
                   **SIZES)
    assert "names no token count: give --tokens_per_step" in err and not (tmp_path / "w").exists()
    long = _refused(capsys, import_hf.import_folders, [str(folder)], tmp_path / "w", tokens_per_step=64,
                    text_dir=str(FIXTURES / "text"), **{**SIZES, "seq_len": 40})
    assert "--seq_len=40 is longer than the model's context of 32 positions" in long


def test_revision_names():
    assert hf.revision_step("stage1-step140000-tokens588B") == 140000
    assert hf.revision_step("stage2-ingredient1-step11931-tokens100B") == 11931
    assert hf.revisions.revision_tokens("stage1-step140000-tokens588B") == 588 * 10**9
    assert hf.revisions.revision_tokens("step1000-tokens4B") == 4 * 10**9
    assert hf.revisions.revision_tokens("step143000") is None
    rev = hf.Revision(140000, FIXTURES, "stage1-step140000-tokens588B")
    assert hf.revisions.tokens_seen(rev, "olmo2", None) == (588 * 10**9, None)
    assert hf.revisions.tokens_seen(rev, "olmo2", 4_194_304) == (140000 * 4_194_304, 4_194_304)
    pythia = hf.Revision(1000, FIXTURES, "step1000")
    assert hf.revisions.tokens_seen(pythia, "gpt_neox", None) == (1000 * 2_097_152, 2_097_152)
    with pytest.raises(hf.HFImportError, match="Pythia's 2,097,152 apply to GPT-NeoX models only"):
        hf.revisions.tokens_seen(pythia, "llama", None)
    assert json.loads((FIXTURES / "olmo2" / "config.json").read_text())["model_type"] == "olmo2"
