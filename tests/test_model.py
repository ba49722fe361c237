"""The transformer: causality by gradient, intermediates from the same pass, jit == eager."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from entropy_jax.models import ModelConfig, Transformer

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
