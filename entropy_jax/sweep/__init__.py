"""The probe sweep: the forward pass over the fixed probe set, probe types as registered
evaluators, and the tidy results table, run over saved checkpoints or inside training."""

from entropy_jax.sweep.evaluators import EVALUATORS, Evaluator, register_evaluator
from entropy_jax.sweep.run import Prober, SweepReport, sweep, training_hook
from entropy_jax.sweep.table import RESULTS_COLUMNS, ResultsTable, load_results

__all__ = [
    "EVALUATORS",
    "RESULTS_COLUMNS",
    "Evaluator",
    "Prober",
    "ResultsTable",
    "SweepReport",
    "load_results",
    "register_evaluator",
    "sweep",
    "training_hook",
]
