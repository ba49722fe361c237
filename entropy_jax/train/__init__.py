"""Training: losses, optimiser, jitted step, loop with log-spaced checkpoints, exact resume and init-from."""

from entropy_jax.train.loop import Lineage, ProbeHook, TrainResult, train
from entropy_jax.train.losses import LOSSES, make_loss
from entropy_jax.train.step import TrainState

__all__ = ["LOSSES", "ProbeHook", "Lineage", "TrainResult", "TrainState", "make_loss", "train"]
