"""A Transformer with a non-parameter variable: a counter of forward calls, updated in place.

Importing this module registers it as ``model.arch = "counting_transformer"``. Run as a script it
is ``experiments/pretrain.py`` with the architecture registered (for the kill-and-resume test).
"""

import jax.numpy as jnp
from absl import app
from flax import nnx

from entropy_jax.models import Transformer, register_architecture


class Calls(nnx.Variable):
    """Not a Param: no gradient, no optimiser state, but saved and restored with the model."""


class CountingTransformer(Transformer):
    def __init__(self, cfg, *, rngs):
        super().__init__(cfg, rngs=rngs)
        self.calls = Calls(jnp.zeros((), jnp.int32))

    def __call__(self, tokens_BxT, return_intermediates=False):
        self.calls[...] = self.calls[...] + 1
        return super().__call__(tokens_BxT, return_intermediates)


register_architecture("counting_transformer", CountingTransformer)

if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from experiments import pretrain

    app.run(pretrain.main)
