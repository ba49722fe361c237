"""What the absl entry points share: errors a user can fix become one clear message and exit 1."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

from absl import app
from absl import logging as absl_logging

from entropy_jax import sweep, train
from entropy_jax.checkpoint import CheckpointReadError, ConfigMismatchError
from entropy_jax.sharding import initialize_distributed

USER_ERRORS = (ConfigMismatchError, CheckpointReadError, FloatingPointError, FileNotFoundError, ValueError)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn a user-fixable error into ``error: <what is wrong and how to fix it>`` and exit status 1."""
    try:
        yield
    except USER_ERRORS as e:
        logging.debug("traceback", exc_info=True)
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


class _LibraryFilter(logging.Filter):
    """Keep warnings from Orbax, TFDS, grain and JAX's backend probe; drop their INFO chatter."""

    NOISY = ("orbax", "tensorflow_datasets", "grain", "xla_bridge")
    EXPECTED = ("Using custom data configuration", "read only", "read_only=True")

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(n in record.pathname for n in self.NOISY):
            return True
        # Warnings about what we ask for on purpose: builder configs made at run time (all of ours)
        # and read-only checkpoint managers (the probe sweep).
        return record.levelno >= logging.WARNING and not any(e in str(record.msg) for e in self.EXPECTED)


def setup_logging() -> None:
    """INFO from entropy_jax, WARNING and above from the libraries it drives."""
    absl_logging.set_verbosity(absl_logging.INFO)
    absl_logging.get_absl_handler().addFilter(_LibraryFilter())


def start(argv: list[str]) -> None:
    """What every entry point does first: reject stray arguments, join the multi-process
    runtime when launched on several hosts, and set up logging."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    initialize_distributed()
    setup_logging()


def apply_init_flags(cfg, init_from: str | None, init_step: int | None) -> None:
    """``--init_from`` / ``--init_step`` are ``config.init_from.workdir`` / ``.step``."""
    if init_from is not None:
        cfg.init_from.workdir = init_from
    if init_step is not None:
        cfg.init_from.step = init_step


def train_with_probes(cfg, workdir) -> train.TrainResult:
    """Train, running the config's ``in_training`` probes at the probe steps (``train.probe_every``)."""
    return train.train(cfg, workdir, on_probe_step=sweep.training_hook(cfg, workdir))


def summarise_training(result) -> str:
    gap = ""
    if result.entropy_rate is not None and result.final_loss is not None:
        gap = (f" = entropy rate {result.entropy_rate:.4f} {result.final_loss - result.entropy_rate:+.4f}"
               " nats/token")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    return (
        f"workdir: {result.workdir}\n"
        f"checkpoints: {len(result.checkpoint_steps)} in {result.workdir / 'checkpoints'} "
        f"(steps {result.checkpoint_steps[0]}..{result.checkpoint_steps[-1]})\n"
        f"metrics: {result.workdir / 'metrics.jsonl'}\n"
        f"final loss (step {result.final_step}): {loss}{gap}"
    )
