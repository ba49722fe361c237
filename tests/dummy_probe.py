"""A probe type from outside the package: the Frobenius norm of every block's attention output
projection W_O, raised to ``power`` (kwarg, > 0; default 1).

Importing this module registers it as ``config.probes.<name> = dict(type="wo_norm", power=...)``:
this file and its last line are all a new probe type needs.
"""

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from entropy_jax.probes.weights import param_path
from entropy_jax.sweep import Context, Evaluator, ModelInfo, Reads, Row, register_evaluator

KIND = "wo_norm"
METRIC = "wo_frobenius_norm"


class OutputProjectionNorm(Evaluator):
    """Row ``(name, block 1..L, -1, "wo_frobenius_norm")``: ``||W_O||_F ** power``."""

    def __init__(self, name: str, entry: Mapping[str, Any], info: ModelInfo | None = None):
        super().__init__(name, entry, info)
        self.power = self.entry.get("power", 1.0)
        if isinstance(self.power, bool) or not isinstance(self.power, (int, float)) or not self.power > 0:
            self.refuse(f"power={self.power!r}", "must be a number > 0")

    def reads(self) -> Reads:
        return Reads()  # the parameters only: no forward pass

    def expected_keys(self) -> set:
        return {(self.name, layer, -1, METRIC) for layer in range(1, self.info.num_layers + 1)}

    def run(self, ctx: Context) -> Iterator[Row]:
        for path, w in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(ctx.params))[0]:
            parts = param_path(path).split("/")  # blocks/<i>/attn/out/kernel
            if parts[0] == "blocks" and parts[2:] == ["attn", "out", "kernel"]:
                norm = np.linalg.norm(np.asarray(jax.device_get(w), np.float64))
                yield (self.name, int(parts[1]) + 1, -1, METRIC), float(norm ** self.power), ""


register_evaluator(KIND, OutputProjectionNorm)
