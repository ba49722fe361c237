"""Training: losses, optimiser, jitted step, loop with log-spaced checkpoints, exact resume and init-from.

Importing the package registers every loss (each loss module registers its own with
:func:`entropy_jax.train.objective.register_loss`); a new loss module is added to the line below.
"""

from entropy_jax.train import grpo, losses  # noqa: F401  (register their losses)
from entropy_jax.train.loop import Lineage, ProbeHook, TrainResult, run, train
from entropy_jax.train.objective import LOSSES, make_loss
from entropy_jax.train.start import Start, plan_start
from entropy_jax.train.step import TrainState

__all__ = ["LOSSES", "Lineage", "ProbeHook", "Start", "TrainResult", "TrainState", "make_loss", "plan_start", "run",
           "train"]
