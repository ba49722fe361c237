"""Importing Hugging Face revisions into a workdir: checkpoints with provenance, the tokenised probe
set, the sweep, phases and plots over them, duplicate flagging, and every refusal with its line."""

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from entropy_jax.analysis import analyse, load_results
from entropy_jax.checkpoint import Checkpoints
from entropy_jax.cli import user_errors
from entropy_jax.models import hf
from entropy_jax.models.hf.probe_text import folder_documents
from entropy_jax.sweep import sweep
from experiments import import_hf

FIXTURES = REPO / "tests" / "testdata" / "hf"
TEXT = FIXTURES / "text"
PROBE = dict(text_dir=str(TEXT), seq_len=16, num_sequences=24, batch_size=8)


def _perturbed(src, dst, seed):
    shutil.copytree(src, dst)
    rng = np.random.default_rng(seed)
    tensors = {k: v + np.float32(0.05) * rng.standard_normal(v.shape, np.float32) if v.dtype == np.float32 and v.ndim
               else v for k, v in load_file(src / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors")


pytestmark = pytest.mark.usefixtures("fast_compiles")  # tiny models: compilation dominates


@pytest.fixture(scope="module")
def revisions(tmp_path_factory):
    """step0 = the fixture, step300 = perturbed weights, step500 = step0's weights again (a duplicate)."""
    root = tmp_path_factory.mktemp("pythia_like")
    shutil.copytree(FIXTURES / "gpt_neox", root / "step0")
    _perturbed(FIXTURES / "gpt_neox", root / "step300", seed=1)
    shutil.copytree(FIXTURES / "gpt_neox", root / "step500")
    return root


@pytest.fixture(scope="module")
def imported(revisions, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imported") / "pythia"
    written = import_hf.import_folders([str(revisions)], workdir, tokens_per_step=1000, **PROBE)
    return workdir, written


def test_each_revision_is_a_checkpoint_with_provenance(imported, revisions):
    workdir, written = imported
    ckpts = Checkpoints(workdir, read_only=True)
    assert written == ckpts.all_steps() == [0, 300, 500]
    metas = {s: ckpts.read_meta(s) for s in written}
    ckpts.close()
    for step, meta in metas.items():
        assert (meta["stage"], meta["tokens_seen"], meta["parent"]) == ("pretrain", step * 1000, None)
        assert meta["source"]["revision"] == f"step{step}" and meta["source"]["tokenizer_size"] == 90
        digest = hashlib.sha256((revisions / f"step{step}" / "model.safetensors").read_bytes()).hexdigest()
        assert meta["source"]["files"] == {"model.safetensors": digest}
        assert meta["model_config"]["vocab_padding"] == 6 and meta["probe_source"]["kind"] == "hf_text"
    assert metas[0]["params_sha256"] == metas[500]["params_sha256"] != metas[300]["params_sha256"]
    assert (metas[0]["duplicate_of"], metas[300]["duplicate_of"], metas[500]["duplicate_of"]) == (None, None, 0)
    kept = (workdir / "probes" / "tokenizer.json").read_bytes()
    assert kept == (FIXTURES / "gpt_neox" / "tokenizer.json").read_bytes()
    # Importing again writes nothing.
    assert import_hf.import_folders([str(revisions)], workdir, tokens_per_step=1000, **PROBE) == []


def test_sweep_table_phases_and_plots(imported):
    workdir, _ = imported
    report = sweep(workdir)
    assert report.probed_steps == [0, 300, 500] and not report.skipped
    table = load_results(workdir)
    assert sorted(table.step.unique()) == [0, 300, 500]
    assert sorted(table.tokens_seen.unique()) == [0, 300_000, 500_000]
    hashes = table.groupby("step").ckpt_hash.first()
    ckpts = Checkpoints(workdir, read_only=True)
    assert hashes[0] == ckpts.read_meta(0)["params_sha256"][:16] == hashes[500] != hashes[300]
    ckpts.close()
    dup = table[table.metric == "duplicate_of_step"]
    assert list(dup.step) == [500] and list(dup.value) == [0.0] and "identical parameters" in dup.note.iloc[0]
    final = table[(table.probe == "last_token") & (table.metric == "rankme") & (table.layer == 2)]
    assert len(final) == 3 and final.value.between(1, 30).all()
    assert (final.set_index("step").value[0] == final.set_index("step").value[500])
    # The weights probe leaves Pythia-style padding rows out: the embedding has the tokenizer's 90 rows.
    assert not table.metric.str.contains("padding").any()
    probe_set = np.load(workdir / "probes" / "probe_set.npz")
    assert probe_set["tokens"].shape == (24, 16)
    analyse(workdir)
    assert (workdir / "probes" / "phases.csv").exists() and list((workdir / "plots").glob("*.png"))


def test_probe_set_protocol():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(FIXTURES / "gpt2" / "tokenizer.json"))
    encoded = [tok.encode(d, add_special_tokens=False).ids for d in folder_documents(TEXT)]
    seq_len = sorted(map(len, encoded))[len(encoded) // 4]  # about a quarter of the paragraphs are too short
    kept = [ids[:seq_len] for ids in encoded if len(ids) >= seq_len]
    assert len(encoded) == 36 and len(kept) < len(encoded) and any(len(ids) > seq_len for ids in encoded)
    source = hf.probe_source(FIXTURES / "gpt2" / "tokenizer.json", text_dir=str(TEXT), seq_len=seq_len,
                             num_sequences=len(kept) - 1, batch_size=8)
    tokens, digest = hf.probe_tokens(source)
    np.testing.assert_array_equal(tokens, np.asarray(kept[:-1]))
    assert digest == hashlib.sha256(np.asarray(kept[:-1], "<i4").tobytes()).hexdigest()
    with pytest.raises(hf.HFImportError, match=f"only {len(kept)} of 36 documents have >= {seq_len} tokens"):
        hf.probe_tokens({**source, "probe_set": {**source["probe_set"], "num_sequences": 1000}})


def _break(kind, folder):
    cfg = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    if kind == "no_config":
        (folder / "config.json").unlink()
    elif kind in ("model_type", "rope_scaling", "rope_type", "activation"):
        cfg.update({"model_type": {"model_type": "mamba"}, "rope_scaling": {"rope_scaling": {"type": "linear"}},
                    "rope_type": {"rope_parameters": {"rope_type": "yarn"}},
                    "activation": {"hidden_act": "swiglu"}}[kind])
        (folder / "config.json").write_text(json.dumps(cfg))
    elif kind in ("missing", "extra", "shape"):
        name = "gpt_neox.layers.1.mlp.dense_h_to_4h.bias"
        if kind == "missing":
            del tensors[name]
        elif kind == "extra":
            tensors["gpt_neox.layers.2.mlp.dense_h_to_4h.bias"] = tensors[name]
        else:
            tensors[name] = tensors[name][:-1]
        save_file(tensors, folder / "model.safetensors")
    elif kind == "bin_only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not read")


REFUSALS = {
    "no_config": "has no config.json", "model_type": "model_type='mamba' is not supported",
    "rope_scaling": "rope_scaling=", "rope_type": "rope_type='yarn' is not supported",
    "activation": "hidden_act='swiglu' is not supported", "missing": "missing gpt_neox.layers.1.mlp.dense_h_to_4h.bias",
    "extra": "unexpected tensors ['gpt_neox.layers.2.mlp.dense_h_to_4h.bias']",
    "shape": "dense_h_to_4h.bias has shape (49,), the config implies (50,)", "bin_only": "need torch",
}


@pytest.mark.parametrize("kind", sorted(REFUSALS))
def test_refusals_give_one_line_exit_2_and_write_nothing(kind, tmp_path, capsys):
    good, bad = tmp_path / "revs" / "step0", tmp_path / "revs" / "step1"
    shutil.copytree(FIXTURES / "gpt_neox", good)
    shutil.copytree(FIXTURES / "gpt_neox", bad)
    _break(kind, bad)
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_, user_errors():
        import_hf.import_folders([str(good), str(bad)], workdir, **PROBE)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert REFUSALS[kind] in err, err
    assert not workdir.exists()


def test_cli_refuses_in_one_line(tmp_path):
    folder = tmp_path / "step0"
    shutil.copytree(FIXTURES / "gpt2", folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 36, "n_layer": 2, "n_head": 4,
                                                    "n_positions": 32, "vocab_size": 90, "scale_attn_weights": False}))
    r = subprocess.run([sys.executable, "experiments/import_hf.py", f"--hf_dir={folder}", f"--workdir={tmp_path / 'w'}",
                        f"--text_dir={TEXT}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stderr.strip().splitlines()[-1] == "error: scale_attn_weights=False is not supported (only True)"
    assert not (tmp_path / "w").exists()


def test_hub_cache_tree_and_revision_names(tmp_path):
    """A Hugging Face cache tree read in place: refs/<branch> names the commit, snapshots/<commit> the files."""
    repo = tmp_path / "hub" / "models--EleutherAI--pythia-tiny"
    for step, commit in ((0, "a" * 40), (1000, "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / f"step{step}").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in (FIXTURES / "gpt_neox").iterdir():
            blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(blob)
    (repo / "refs" / "main").write_text("c" * 40)  # no snapshot, no step: not a revision
    for where in (repo, tmp_path / "hub"):
        revs = hf.find_revisions([where])
        assert [(r.step, r.name, r.commit, r.repo) for r in revs] == [
            (0, "step0", "a" * 40, "EleutherAI/pythia-tiny"), (1000, "step1000", "b" * 40, "EleutherAI/pythia-tiny")]
    assert hf.revision_step("step143000") == 143000 and hf.revision_step("step1000-tokens4B") == 1000
    with pytest.raises(hf.HFImportError, match="cannot read a training step from revision 'main'"):
        hf.revision_step("main")
    assert len(hf.revisions.PYTHIA_STEPS) == 154


def test_weights_straight_from_files(revisions, tmp_path):
    out = import_hf.weights_from_files([str(revisions / "step300")], tmp_path / "w")
    import pandas as pd

    table = pd.read_csv(out)
    assert set(table.step) == {300} and table.matrix.nunique() == 2 * 6 + 2
    raw = load_file(revisions / "step300" / "model.safetensors")
    s = np.linalg.svd(raw["embed_out.weight"][:90].astype(np.float64), compute_uv=False)  # padding rows left out
    row = table[(table.matrix == "unembed/kernel") & (table.metric == "spectral_norm")]
    np.testing.assert_allclose(row.value.iloc[0], s[0], rtol=1e-6)
