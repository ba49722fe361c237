"""Training: optimiser, jitted step, loop with log-spaced checkpoints and exact resume."""

from entropy_jax.train.loop import TrainResult, model_config, train

__all__ = ["TrainResult", "model_config", "train"]
