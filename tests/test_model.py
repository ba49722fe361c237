"""The transformer: causality by gradient, intermediates from the same pass, jit == eager, decoding with the
key/value cache == the full forward pass for every switch set and registered Hugging Face family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropy_jax.models import ModelConfig, Transformer, hf
from entropy_jax.train.sampling import sample, sample_recompute

T = 8


class _ShiftedEmbed(nnx.Module):
    """Adds a trainable offset to the embedding output, so gradients w.r.t. positions exist."""

    def __init__(self, embed: nnx.Embed, delta: jax.Array):
        self.embed, self.delta = embed, nnx.Param(delta)

    def __call__(self, tokens):
        return self.embed(tokens) + self.delta[...]

    def attend(self, h):
        return self.embed.attend(h)


def _model(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=37, d_model=16, num_layers=2, num_heads=2, max_len=T, **kw)
    return Transformer(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kw", [{}, {"positions": "rope", "norm": "rmsnorm", "tie_embeddings": True}])
def test_causality_by_gradient(kw):
    model = _model(**kw)
    model.embed = _ShiftedEmbed(model.embed, jnp.zeros((1, T, 16)))
    tokens = jax.random.randint(jax.random.key(1), (2, T), 0, 37)
    graphdef, delta, rest = nnx.split(model, lambda path, _: "delta" in path, ...)
    for t in range(T):
        def out_t(delta, t=t):
            return nnx.merge(graphdef, delta, rest)(tokens)[:, t].sum()
        g = jax.tree.leaves(jax.grad(out_t)(delta))[0][0]  # T x D
        assert np.all(np.asarray(g[t + 1:]) == 0.0), f"position {t} sees the future"
        assert np.all(np.abs(np.asarray(g[: t + 1])).sum(-1) > 0), f"position {t} ignores its past"


def test_intermediates_come_from_the_same_pass():
    model = _model()
    tokens = jax.random.randint(jax.random.key(2), (3, T), 0, 37)
    logits, inter = model(tokens, return_intermediates=True)
    np.testing.assert_array_equal(logits, model(tokens))
    assert logits.shape == (3, T, 37)
    res, att = inter["residual"], inter["attention_logits"]
    assert len(res) == 3 and all(r.shape == (3, T, 16) for r in res)
    # The last hidden state is after the final norm: layer-norm output has zero mean, unit variance.
    np.testing.assert_allclose(res[-1].mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(model.unembed(res[-1]), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res[0], model.embed(tokens) + model.pos_embed(jnp.arange(T))[None])
    assert len(att) == 2 and att[0].shape == (3, 2, T, T)
    future = np.triu(np.ones((T, T), bool), 1)
    assert np.all(np.asarray(att[0])[..., future] == np.finfo(np.float32).min)
    assert np.all(np.isfinite(np.asarray(att[0])[..., ~future]))


def test_jit_equals_eager():
    model = _model(positions="rope")
    tokens = jax.random.randint(jax.random.key(3), (2, T), 0, 37)
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    np.testing.assert_allclose(jitted(state, tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="num_heads"):
        ModelConfig(vocab_size=10, d_model=10, num_heads=4)
    with pytest.raises(ValueError, match="norm"):
        ModelConfig(vocab_size=10, norm="batchnorm")
    with pytest.raises(ValueError, match="unknown model config keys"):
        ModelConfig.from_dict({"vocab_size": 10, "width": 3})
    with pytest.raises(ValueError, match="max_len"):
        _model()(jnp.zeros((1, T + 1), jnp.int32))


# Decoding with the key/value cache, for the native switches and every registered Hugging Face
# family (a tiny random-weight model of the family's own config mapping, 3 padding rows).
NATIVE = {
    "learned_layernorm_gelu": {},
    "rope_rmsnorm_silu_tied": {"positions": "rope", "norm": "rmsnorm", "activation": "silu", "tie_embeddings": True,
                               "d_ff": 24},
    "learned_relu_tied_biases": {"activation": "relu", "tie_embeddings": True, "attention_bias": True, "d_ff": 40},
    "partial_rope_parallel_padding": {"positions": "rope", "rotary_fraction": 0.5, "parallel_residual": True,
                                      "activation": "gelu_exact", "mlp_bias": False, "vocab_padding": 3},
    "gqa_head_dim_swiglu_qk_norm_sublayer_post": {"positions": "rope", "norm": "rmsnorm", "activation": "swiglu",
                                                  "num_kv_heads": 1, "head_dim": 6, "qk_norm": True,
                                                  "norm_placement": "sublayer_post", "d_ff": 24},
}
SWITCH_SETS = [*(f"native:{n}" for n in NATIVE), *(f"family:{t}" for t in sorted(hf.families.FAMILIES))]
P_LEN, ANSWER = 5, 4


def _random_model(switches: str) -> Transformer:
    """A model of the switch set with every variable (biases, norm scales, padding rows) random."""
    kind, name = switches.split(":")
    if kind == "native":
        cfg = ModelConfig(vocab_size=37, d_model=16, num_layers=2, num_heads=2, max_len=12, **NATIVE[name])
    else:
        tiny = hf.families.FAMILIES[name].tiny_config
        cfg = hf.model_config(tiny, tokens=tiny["vocab_size"] - 3)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, [0.5 * jax.random.normal(k, x.shape, x.dtype)
                                                            for k, x in zip(keys, leaves, strict=True)]))


@pytest.mark.parametrize("switches", SWITCH_SETS)
def test_cached_decoding_equals_the_full_forward(switches):
    """Prefill, then one position per step through the cache: the logits of the full forward pass
    at every position (one compiled step serves all positions: the cache's end is traced)."""
    model = _random_model(switches)
    v = model.cfg.vocab_size
    tokens = jax.random.randint(jax.random.key(8), (3, P_LEN + ANSWER), 0, v)
    graphdef, state = nnx.split(model)
    full = np.asarray(jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens))
    traces = []

    @jax.jit
    def step(s, t, c):
        traces.append(t.shape)
        return nnx.merge(graphdef, s)(t, cache=c)

    logits, cache = step(state, tokens[:, :P_LEN], model.init_cache(3, P_LEN + ANSWER))
    cached = [np.asarray(logits)]
    for i in range(P_LEN, P_LEN + ANSWER):
        logits, cache = step(state, tokens[:, i:i + 1], cache)
        cached.append(np.asarray(logits))
    assert int(cache.end) == P_LEN + ANSWER and traces == [(3, P_LEN), (3, 1)]  # prefill + one decode step
    np.testing.assert_allclose(np.concatenate(cached, axis=1), full, rtol=1e-5, atol=1e-5)
    assert np.abs(full[:, 1:] - full[:, :-1]).max() > 0.1  # positions differ: a wrong position would show


@pytest.mark.parametrize("switches", SWITCH_SETS)
def test_cached_sampling_equals_full_recompute(switches):
    model = _random_model(switches)
    prompts = jax.random.randint(jax.random.key(9), (8, P_LEN), 0, model.cfg.vocab_size)
    graphdef, state = nnx.split(model)
    for temperature in (0.0, 1.0):
        run = lambda fn, t=temperature: jax.jit(lambda s, p: fn(nnx.merge(graphdef, s), p, ANSWER,
                                                                jax.random.key(2), t))(state, prompts)
        fast = run(sample)
        np.testing.assert_array_equal(fast, run(sample_recompute))
    assert len(np.unique(np.asarray(fast))) > 4  # sampled, not one repeated token
