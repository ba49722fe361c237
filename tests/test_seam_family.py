"""The architecture-family seam: a family added as one module plus one registration
(tests/dummy_family.py, ``model_type = "dummy_gpt"``) imports through the ordinary path, and the
imported model's logits equal an independent float64 numpy forward of the same weights."""

import json
import shutil

import dummy_family  # noqa: F401  (registers "dummy_gpt")
import jax
import numpy as np
import pytest
from conftest import REPO
from fixtures.numpy_reference import gpt2 as numpy_gpt2
from safetensors.numpy import save_file

from entropy_jax.checkpoint import Checkpoints, content_hash
from entropy_jax.models import hf
from experiments import import_hf

FIXTURES = REPO / "tests" / "testdata" / "hf"
D, HEADS, LAYERS, CONTEXT, VOCAB = 12, 3, 2, 16, 96  # the gpt2 fixture's tokenizer has 90 tokens: 6 padding rows
CONFIG = {"model_type": "dummy_gpt", "dim": D, "layers": LAYERS, "heads": HEADS, "context": CONTEXT,
          "vocab_size": VOCAB}
GPT2_CONFIG = {"model_type": "gpt2", "n_embd": D, "n_head": HEADS, "n_layer": LAYERS}  # what the numpy reference reads


def _gpt2_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under GPT-2's names and Conv1D ``[in, out]`` layouts."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.3 * rng.standard_normal(shape)).astype(np.float32)
    w = {"wte.weight": r(VOCAB, D), "wpe.weight": r(CONTEXT, D), "ln_f.weight": 1 + r(D), "ln_f.bias": r(D)}
    for i in range(LAYERS):
        p = f"h.{i}."
        w |= {p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D), p + "ln_2.weight": 1 + r(D), p + "ln_2.bias": r(D),
              p + "attn.c_attn.weight": r(D, 3 * D), p + "attn.c_attn.bias": r(3 * D),
              p + "attn.c_proj.weight": r(D, D), p + "attn.c_proj.bias": r(D),
              p + "mlp.c_fc.weight": r(D, 4 * D), p + "mlp.c_fc.bias": r(4 * D),
              p + "mlp.c_proj.weight": r(4 * D, D), p + "mlp.c_proj.bias": r(D)}
    return w


def _as_dummy(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same weights under the dummy family's names: ``nn.Linear`` ``[out, in]``, q, k, v apart."""
    out = {"tok_embeddings.weight": w["wte.weight"], "pos_embeddings.weight": w["wpe.weight"],
           "norm.weight": w["ln_f.weight"], "norm.bias": w["ln_f.bias"]}
    for i in range(LAYERS):
        g, p = f"h.{i}.", f"layers.{i}."
        qkv_w, qkv_b = np.split(w[g + "attn.c_attn.weight"], 3, axis=1), np.split(w[g + "attn.c_attn.bias"], 3)
        for j, name in enumerate("qkv"):
            out[p + f"attn.{name}.weight"], out[p + f"attn.{name}.bias"] = qkv_w[j].T, qkv_b[j]
        for ours, theirs in (("attn.o", "attn.c_proj"), ("ffn.fc1", "mlp.c_fc"), ("ffn.fc2", "mlp.c_proj")):
            out[p + ours + ".weight"], out[p + ours + ".bias"] = w[g + theirs + ".weight"].T, w[g + theirs + ".bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            out[p + ours + ".weight"], out[p + ours + ".bias"] = w[g + theirs + ".weight"], w[g + theirs + ".bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _write(folder, tensors):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(CONFIG))
    shutil.copy(FIXTURES / "gpt2" / "tokenizer.json", folder)
    save_file(tensors, folder / "model.safetensors")
    return folder


def _logits(folder, tokens):
    model = hf.load_hf_checkpoint(folder)
    return np.asarray(jax.jit(lambda t: model(t))(tokens))


@pytest.fixture(scope="module")
def weights():
    return _gpt2_weights()


@pytest.fixture(scope="module")
def tokens():
    tokens = np.random.default_rng(1).integers(0, 90, size=(2, CONTEXT))
    tokens[0, :2] = [91, 95]  # padding rows embed too
    return tokens


def test_the_dummy_family_is_registered_and_named_in_refusals():
    assert hf.families.FAMILIES["dummy_gpt"].config is dummy_family.config
    with pytest.raises(hf.HFImportError, match="model_type='mamba' is not supported; supported: .*dummy_gpt"):
        hf.model_config({"model_type": "mamba"})


def test_imported_logits_equal_numpy_float64(weights, tokens, tmp_path):
    folder = _write(tmp_path / "step0", _as_dummy(weights))
    assert hf.check_hf_folder(folder).vocab_padding == 6
    logits = _logits(folder, tokens)
    reference, _ = numpy_gpt2(GPT2_CONFIG, {k: v.astype(np.float64) for k, v in weights.items()}, tokens)
    assert logits.shape == (2, CONTEXT, VOCAB) and np.abs(reference).max() > 1.0
    np.testing.assert_allclose(logits, reference, rtol=2e-6, atol=1e-5)
    # The comparison sees a wrong mapping: queries and keys swapped in the file change the logits.
    swapped = _as_dummy(weights)
    for i in range(LAYERS):
        q, k = f"layers.{i}.attn.q.weight", f"layers.{i}.attn.k.weight"
        swapped[q], swapped[k] = swapped[k], swapped[q]
    assert np.abs(_logits(_write(tmp_path / "swapped", swapped), tokens) - reference).max() > 1e-2


def test_imports_into_a_workdir_and_refuses_by_the_familys_names(weights, tmp_path):
    root = tmp_path / "revs"
    _write(root / "step0", _as_dummy(weights))
    workdir = tmp_path / "dummy"
    probe = dict(text_dir=str(FIXTURES / "text"), seq_len=CONTEXT, num_sequences=8, batch_size=8)
    assert import_hf.import_folders([str(root)], workdir, tokens_per_step=1000, **probe) == [0]
    with Checkpoints(workdir, read_only=True) as ckpts:
        meta = ckpts.read_meta(0)
    assert meta["source"]["model_type"] == "dummy_gpt" and meta["model_config"]["vocab_padding"] == 6
    assert meta["params_sha256"] == content_hash(hf.read_hf_checkpoint(root / "step0", hash_files=False).params)
    broken = _as_dummy(weights)
    del broken["layers.1.ffn.fc1.bias"]
    with pytest.raises(hf.HFImportError, match=r"missing layers\.1\.ffn\.fc1\.bias \(48,\)"):
        hf.check_hf_folder(_write(tmp_path / "broken" / "step0", broken))
