"""The probe sweep: the forward pass over the fixed probe set, probe types as registered
evaluators, and the tidy results table, run over saved checkpoints or inside training."""

from entropy_jax.sweep.evaluators import EVALUATORS, Context, Evaluator, ModelInfo, Row, register_evaluator
from entropy_jax.sweep.forward import Reads
from entropy_jax.sweep.run import Prober, SweepReport, sweep, training_hook
from entropy_jax.sweep.table import RESULTS_COLUMNS, ResultsTable, load_results

__all__ = [
    "EVALUATORS",
    "RESULTS_COLUMNS",
    "Context",
    "Evaluator",
    "ModelInfo",
    "Prober",
    "Reads",
    "ResultsTable",
    "Row",
    "SweepReport",
    "load_results",
    "register_evaluator",
    "sweep",
    "training_hook",
]
