"""Hugging Face GPT-NeoX (Pythia), GPT-2, Llama, OLMo-2, Qwen2 and Mistral weights in the NNX
Transformer: exact against transformers (reference outputs committed by
tests/fixtures/make_hf_fixtures.py) and against an independent float64 numpy forward; both
config.json dialects, bfloat16 files, FSDP placement, padding rows, refusals."""

import functools
import json
import re
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from conftest import REPO
from fixtures.numpy_reference import forward as numpy_forward
from flax import nnx
from safetensors.numpy import load_file, save_file

from entropy_jax.models import ModelConfig, Transformer, hf
from entropy_jax.probes import weight_spectra
from entropy_jax.sharding import make_mesh

FIXTURES = REPO / "tests" / "testdata" / "hf"
LLAMA_SHAPED = ("llama", "olmo2", "qwen2", "mistral")
MODELS = ("gpt_neox", "gpt2", *LLAMA_SHAPED)


def _hf_tensors(folder):
    """All tensors of a fixture folder, read with safetensors itself (not entropy_jax's reader)."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens, return_intermediates=True)


def _forward(model, tokens):
    """One jitted forward, compiled once per model graph (not once per eager op: the tests stay fast)."""
    logits, inter = _apply(*nnx.split(model), tokens)
    return np.asarray(logits), [np.asarray(h) for h in inter["residual"]]


def _run(folder, tokens):
    return _forward(hf.load_hf_checkpoint(folder), tokens)


@pytest.fixture(scope="module", params=MODELS)
def outputs(request):
    folder = FIXTURES / request.param
    ref = np.load(folder / "reference.npz")
    return folder, ref, _run(folder, ref["tokens"])


def test_matches_transformers_within_1e_4(outputs):
    folder, ref, (logits, hidden) = outputs
    num_layers = json.loads((folder / "config.json").read_text()).get("num_hidden_layers", 2)
    assert len(hidden) == num_layers + 1 == len([k for k in ref.files if k.startswith("hidden_")])
    assert logits.shape == ref["logits"].shape and np.abs(ref["logits"]).max() > 1.0
    np.testing.assert_allclose(logits, ref["logits"], rtol=0, atol=1e-4)
    for i, h in enumerate(hidden):  # embedding output first, the last one after the final norm
        np.testing.assert_allclose(h, ref[f"hidden_{i}"], rtol=0, atol=1e-4, err_msg=f"hidden state {i}")


def test_matches_numpy_float64_within_1e_5(outputs):
    folder, ref, (logits, hidden) = outputs
    cfg = json.loads((folder / "config.json").read_text())
    np_logits, np_hidden = numpy_forward(cfg, _hf_tensors(folder), ref["tokens"])
    # float32 against float64: 1e-5 absolute, plus 16 float32 ulps of the value (hidden entries reach ~10).
    np.testing.assert_allclose(logits, np_logits, rtol=2e-6, atol=1e-5)
    for i, (h, r) in enumerate(zip(hidden, np_hidden, strict=True)):
        np.testing.assert_allclose(h, r, rtol=2e-6, atol=1e-5, err_msg=f"hidden state {i}")
    # The reference is a real second opinion: a wrong head split changes the numbers.
    if cfg["model_type"] == "gpt_neox":
        w = dict(_hf_tensors(folder))
        name = "gpt_neox.layers.0.attention.query_key_value.weight"
        w[name] = w[name].reshape(3, -1, w[name].shape[1]).transpose(1, 0, 2).reshape(w[name].shape)
        assert np.abs(numpy_forward(cfg, w, ref["tokens"])[0] - np_logits).max() > 1e-2
    if cfg["model_type"] == "llama":  # the llama3 scaling changes the fixture's numbers
        plain = {**cfg, "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}}
        assert np.abs(numpy_forward(plain, _hf_tensors(folder), ref["tokens"])[0] - np_logits).max() > 1e-2


@pytest.mark.parametrize("model_type", LLAMA_SHAPED)
def test_hub_config_dialect_is_the_same_model(model_type):
    """The older dialect (top-level rope_theta, rope_scaling) maps to the same ModelConfig as the
    transformers-5 rope_parameters, and the independent reference agrees on both."""
    folder = FIXTURES / model_type
    new, old = (json.loads((folder / name).read_text()) for name in ("config.json", "hub_config.json"))
    assert "rope_parameters" in new and "rope_parameters" not in old and "rope_theta" in old
    assert hf.model_config(old, 90) == hf.model_config(new, 90)
    tokens, tensors = np.load(folder / "reference.npz")["tokens"], _hf_tensors(folder)
    np.testing.assert_array_equal(numpy_forward(old, tensors, tokens)[0], numpy_forward(new, tensors, tokens)[0])


def test_family_switches():
    """What each family's config.json sets: GQA, head_dim, rope scaling, QK-norm, norm placement, biases."""
    cfg = {t: hf.model_config(json.loads((FIXTURES / t / "config.json").read_text()), 90) for t in LLAMA_SHAPED}
    assert all((c.kv_heads, c.d_head, c.activation, c.norm) == ((1 if t == "mistral" else 2), 6, "swiglu", "rmsnorm")
               for t, c in cfg.items())
    assert (cfg["llama"].rope_scaling, cfg["llama"].rope_factor, cfg["llama"].rope_original_max_len) == ("llama3", 4, 8)
    assert (cfg["llama"].attention_bias, cfg["llama"].mlp_bias, cfg["llama"].vocab_padding) == (True, True, 6)
    assert (cfg["olmo2"].qk_norm, cfg["olmo2"].norm_placement) == (True, "sublayer_post")
    assert (cfg["qwen2"].attention_bias, cfg["qwen2"].attention_out_bias, cfg["qwen2"].tie_embeddings) == (True, False,
                                                                                                           True)
    assert (cfg["mistral"].rope_scaling, cfg["mistral"].rope_factor, cfg["mistral"].max_len) == ("linear", 2.0, 16)
    assert all(not c.qk_norm for t, c in cfg.items() if t != "olmo2")
    dynamic = json.loads((FIXTURES / "olmo2" / "config.json").read_text())
    dynamic["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 500.0, "factor": 2.0}
    assert hf.model_config(dynamic, 90) == cfg["olmo2"]  # equal to default within max_position_embeddings


REFUSED = {  # family, config.json change, the line
    "yarn": ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
             "rope_type='yarn' is not supported"),
    "partial_rotary": ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                     "partial_rotary_factor": 0.5}},
                       "partial_rotary_factor=0.5 is not supported"),
    "gelu": ("olmo2", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for olmo2"),
    "pretraining_tp": ("llama", {"pretraining_tp": 2}, "pretraining_tp=2 is not supported"),
    "sliding_window": ("qwen2", {"use_sliding_window": True, "sliding_window": 8},
                       "use_sliding_window=True (sliding-window attention) is not supported for qwen2"),
    "per_layer_rope": ("mistral", {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
                       "rope_parameters per layer type"),
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_unsupported_options_are_refused_by_name(kind):
    model_type, change, line = REFUSED[kind]
    cfg = {**json.loads((FIXTURES / model_type / "config.json").read_text()), **change}
    with pytest.raises(hf.HFImportError, match=re.escape(line)):
        hf.model_config(cfg, 90)


def test_bfloat16_olmo2_files_read_exactly():
    """OLMo-2's fixture stores bfloat16: widened bit-exactly to float32, no float64 step."""
    folder = FIXTURES / "olmo2"
    header, _ = hf.safetensors_io.read_header(folder / "model.safetensors")
    assert {e["dtype"] for e in header.values()} == {"BF16"}
    tensors = hf.read_tensors(folder)
    w = tensors["model.layers.0.self_attn.q_norm.weight"]
    assert w.dtype == np.float32 and w.shape == (24,)
    np.testing.assert_array_equal(w, w.astype(ml_dtypes.bfloat16).astype(np.float32))


def test_transformers5_config_dialect_and_lm_head_name(tmp_path):
    """transformers 5 writes rope_parameters and lm_head.weight; the Hub's Pythia files rotary_pct and embed_out."""
    src, dst = FIXTURES / "gpt_neox", tmp_path / "step0"
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rotary_emb_base"),
                              "partial_rotary_factor": cfg.pop("rotary_pct")}
    (dst / "config.json").write_text(json.dumps(cfg))
    tensors = {("lm_head.weight" if k == "embed_out.weight" else k): v for k, v in _hf_tensors(src).items()
               if not k.endswith(("attention.bias", "masked_bias", "inv_freq"))}
    save_file(tensors, dst / "model.safetensors")
    ref = np.load(src / "reference.npz")
    assert hf.model_config(cfg, 90) == hf.model_config(json.loads((src / "config.json").read_text()), 90)
    np.testing.assert_array_equal(_run(dst, ref["tokens"])[0], _run(src, ref["tokens"])[0])


@pytest.mark.parametrize("variant", ["sequential_residual", "tied_with_padding"])
def test_neox_variants_match_numpy(variant, tmp_path):
    """GPT-NeoX with use_parallel_residual=False, and with tied embeddings over padded rows."""
    src, dst = FIXTURES / "gpt_neox", tmp_path / "step0"
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    tensors = _hf_tensors(src)
    if variant == "sequential_residual":
        cfg["use_parallel_residual"] = False
    else:
        cfg["tie_word_embeddings"] = True
        del tensors["embed_out.weight"]
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, dst / "model.safetensors")
    tokens = np.load(src / "reference.npz")["tokens"]
    tokens[0, :3] = [91, 95, 93]  # padding rows are reachable through the logits only; embed a few anyway
    logits, hidden = _run(dst, tokens)
    np_logits, np_hidden = numpy_forward(cfg, tensors, tokens)
    np.testing.assert_allclose(logits, np_logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(hidden[1], np_hidden[1], rtol=0, atol=1e-5)
    assert np.abs(np_logits - np.load(src / "reference.npz")["logits"]).max() > 1e-2  # the variant differs


def _write_bf16(path, tensors):
    """A safetensors file with BF16 tensors, written from the format description."""
    header, blobs, offset = {}, [], 0
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a.astype(ml_dtypes.bfloat16)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_bfloat16_files(tmp_path):
    src, dst = FIXTURES / "gpt2", tmp_path / "gpt2_bf16"
    dst.mkdir()
    shutil.copy(src / "config.json", dst)
    tensors = _hf_tensors(src)
    _write_bf16(dst / "model.safetensors", tensors)
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float64) for k, v in tensors.items()}
    tokens = np.load(src / "reference.npz")["tokens"]
    logits, hidden = _run(dst, tokens)
    np_logits, _ = numpy_forward(json.loads((src / "config.json").read_text()), rounded, tokens)
    np.testing.assert_allclose(logits, np_logits, rtol=0, atol=1e-5)
    assert np.abs(np_logits - np.load(src / "reference.npz")["logits"]).max() > 1e-4  # bf16 rounding did happen


def test_fsdp_sharding_gives_the_same_model():
    folder = FIXTURES / "gpt2"  # d_model 36, d_ff 144: divisible by the 4 test devices
    mesh = make_mesh()
    tokens = np.load(folder / "reference.npz")["tokens"]
    sharded = hf.read_hf_checkpoint(folder, mesh, fsdp=True, hash_files=False)
    up = sharded.params["blocks"][0]["mlp"]["up"]["kernel"][...]  # 36 x 144: the 144 axis is split
    assert mesh.devices.size == 4 and up.sharding.spec == jax.sharding.PartitionSpec(None, "data")
    assert {s.data.shape for s in up.addressable_shards} == {(36, 36)}
    embed = sharded.params["embed"]["embedding"][...]  # 90 x 36: 90 does not divide, 36 does
    assert {s.data.shape for s in embed.addressable_shards} == {(90, 9)}
    np.testing.assert_allclose(_forward(sharded.model(), tokens)[0], _run(folder, tokens)[0], rtol=0, atol=1e-5)


def test_fsdp_spec_splits_the_largest_divisible_axis():
    from entropy_jax.sharding import fsdp_spec

    P = jax.sharding.PartitionSpec
    assert fsdp_spec((768, 3072), 4) == P(None, "data")
    assert fsdp_spec((50304, 768), 4) == P("data", None)
    assert fsdp_spec((30,), 4) == P() and fsdp_spec((768,), 1) == P()


def test_padding_rows_are_model_state_not_parameters():
    ckpt = hf.read_hf_checkpoint(FIXTURES / "gpt_neox", hash_files=False)
    cfg, raw = ckpt.model_config, _hf_tensors(FIXTURES / "gpt_neox")
    assert (cfg.vocab_size, cfg.vocab_padding, ckpt.tokenizer_size) == (96, 6, 90)
    params, state = nnx.to_pure_dict(ckpt.params), nnx.to_pure_dict(ckpt.model_state)
    np.testing.assert_array_equal(params["embed"]["embedding"], raw["gpt_neox.embed_in.weight"][:90])
    np.testing.assert_array_equal(state["embed_padding"], raw["gpt_neox.embed_in.weight"][90:])
    np.testing.assert_array_equal(state["unembed_padding"], raw["embed_out.weight"][90:].T)
    # Weight statistics straight from the files: the same matrices, no padding, no model built.
    from_files = hf.weight_matrices(FIXTURES / "gpt_neox")
    assert from_files["embed"]["embedding"].shape == (90, 30) and "embed_padding" not in from_files
    jax.tree.map(np.testing.assert_array_equal, from_files, jax.tree.map(np.asarray, params))
    spectra = weight_spectra({"blocks": {1: {"attn": {"out": from_files["blocks"][1]["attn"]["out"]}}}})
    s = np.linalg.svd(raw["gpt_neox.layers.1.attention.dense.weight"].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(spectra["blocks/1/attn/out/kernel"]["spectral_norm"], s[0], rtol=1e-6)


def test_new_switches_default_to_the_old_model():
    """A config without the new fields builds exactly the old parameter tree (no biases on W_Q..W_O)."""
    old = ModelConfig(vocab_size=37, d_model=16, num_layers=1, num_heads=2, max_len=8)
    params = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: Transformer(old, rngs=nnx.Rngs(0))), nnx.Param, ...)[1])
    attn = params["blocks"][0]["attn"]
    assert all(set(attn[n]) == {"kernel"} for n in ("query", "key", "value", "out"))
    assert set(params["blocks"][0]["mlp"]["up"]) == {"kernel", "bias"}
    assert (old.norm_eps, old.norm_fast_variance, old.parallel_residual, old.vocab_padding) == (1e-6, True, False, 0)
    assert (old.rotary_fraction, old.rotary_base) == (1.0, 10_000.0)
    with pytest.raises(ValueError, match="rotary"):
        ModelConfig(vocab_size=37, d_model=16, num_heads=2, positions="rope", rotary_fraction=0.1)
