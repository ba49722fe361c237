"""Training: losses, optimiser, jitted step, loop with log-spaced checkpoints, exact resume and init-from."""

from entropy_jax.train.loop import Lineage, ProbeHook, TrainResult, run, train
from entropy_jax.train.losses import LOSSES, make_loss
from entropy_jax.train.start import Start, plan_start
from entropy_jax.train.step import TrainState

__all__ = ["LOSSES", "Lineage", "ProbeHook", "Start", "TrainResult", "TrainState", "make_loss", "plan_start", "run",
           "train"]
