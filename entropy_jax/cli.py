"""What the absl entry points share: flag parsing, validation before anything is written, and one
exit-status convention.

Exit status of every entry point (run.py, experiments/pretrain.py, probe.py, plot.py):
  0  done;
  1  an unexpected error: a bug, reported with its traceback;
  2  bad input, reported as one line ``error: <what is wrong and how to fix it>`` with nothing
     written: an unknown or ill-typed flag or config key, a value out of range, a missing file,
     a workdir holding another config's checkpoints; also a full disk or a read-only folder;
  3  probe.py / run.py finished but skipped checkpoints that could not be read (each is reported).
"""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_dict, config_flags

from entropy_jax import sweep, train, validate
from entropy_jax.checkpoint import CheckpointReadError, ConfigMismatchError, saved_steps
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.sharding import initialize_distributed
from entropy_jax.train.interrupt import TrainingInterrupted
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.workdir import Workdir, check_writable

EXIT_BAD_INPUT = 2
EXIT_SKIPPED = 3
# The project's own input errors; ConfigMismatchError, CheckpointReadError and the divergence
# FloatingPointError are named until they derive from UserError.
USER_ERRORS = (UserError, ConfigMismatchError, CheckpointReadError, FloatingPointError)
# Errors of the machine, not of the code: a full disk, a read-only or forbidden folder.
ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def fail(message: Any) -> NoReturn:
    """Print ``error: <message>`` on one line and exit with status 2."""
    print("error: " + re.sub(r"\s*\n\s*", " ", str(message)).strip(), file=sys.stderr, flush=True)
    sys.exit(EXIT_BAD_INPUT)


def environment_error(e: BaseException) -> OSError | None:
    """The OSError of a full disk or a read-only folder in ``e``'s chain of causes, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS:
            return e
        e = e.__cause__ or e.__context__
    return None


def describe_environment_error(e: OSError) -> str:
    where = f" writing {e.filename}" if e.filename else ""
    fix = ("free some space or use a --workdir on another disk" if e.errno in (errno.ENOSPC, errno.EDQUOT)
           else "make it writable or use another --workdir")
    return f"{e.strerror or errno.errorcode.get(e.errno, e.errno)}{where}: {fix}"


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn the project's input errors (and a full disk / read-only folder) into one line and
    exit status 2; anything else is a bug and keeps its traceback."""
    try:
        yield
    except USER_ERRORS as e:
        logging.debug("traceback", exc_info=True)
        fail(e)
    except Exception as e:
        cause = environment_error(e)
        if cause is None:
            raise
        logging.debug("traceback", exc_info=True)
        fail(describe_environment_error(cause))
    except TrainingInterrupted as e:  # a clean stop between steps: 130 (SIGINT) / 143 (SIGTERM)
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("stopped: interrupted (SIGINT)", file=sys.stderr, flush=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# Flags: the config file and its overrides are checked before absl sees them, so an unknown key
# or a missing file is one line, not ml_collections' chained tracebacks.

_CONFIG_ARG = re.compile(r"^--?config(?:=(.*))?$")
_OVERRIDE_ARG = re.compile(r"^--?(?:no)?config\.([^=]+)")


def _config_argument(argv: list[str], default: str | None) -> str | None:
    for i, arg in enumerate(argv):
        m = _CONFIG_ARG.match(arg)
        if m:
            return m.group(1) if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
    return default


def _last_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def load_config_file(spec: str) -> config_dict.ConfigDict:
    """``get_config(<preset>)`` of the file in ``spec`` = ``path[:preset]`` (as config_flags reads it);
    UserError when the file is missing or its own code fails (an unknown preset, say)."""
    path, colon, preset = spec.partition(":")
    if not path or not Path(path).is_file():
        raise UserError(f"--config={spec}: no config file {path!r}; give one such as "
                        "experiments/configs/pretrain.py:tiny")
    module_spec = importlib.util.spec_from_file_location("_entropy_jax_checked_config", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
        return module.get_config(*([preset] if colon else []))
    except Exception as e:  # the config file's code, not ours
        raise UserError(f"--config={spec}: {type(e).__name__}: {_last_line(e)}") from e


def config_override_problem(argv: list[str], default: str | None) -> str | None:
    """What is wrong with ``--config`` and its ``--config.<key>=`` overrides in ``argv``, or None."""
    keys = [m.group(1) for m in map(_OVERRIDE_ARG.match, argv) if m]
    path = _config_argument(argv, default)
    if path is None:
        return f"--config.{keys[0]} needs --config=<file>" if keys else None
    try:
        config = load_config_file(path)
    except UserError as e:
        return str(e)
    for key in keys:
        node = config
        for depth, part in enumerate(key.split(".")):
            known = list(node.keys()) if isinstance(node, (config_dict.ConfigDict, dict)) else []
            if part not in known:
                where = ".".join(["config", *key.split(".")[:depth]])
                return (f"unknown config key --config.{key}: {where} has no {part!r}{did_you_mean(part, known)}"
                        + (f" (keys: {', '.join(map(str, known))})" if known else ""))
            node = node[part]
    return None


def define_config_flag(default: str | None, help_string: str) -> flags.FlagHolder:
    """``DEFINE_config_file("config", ..., lock_config=True)`` after checking the file and the
    override keys on the command line (absl would load a default config at definition time)."""
    problem = config_override_problem(sys.argv, default)
    if problem:
        fail(problem)
    return config_flags.DEFINE_config_file("config", default, help_string, lock_config=True)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing with our convention: a bad flag is one line and exit status 2; --help exits 0."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        fail(f"{_last_line(e)} (--helpshort lists the flags)")
    except SystemExit as e:  # absl's --help prints the usage and exits 1
        if e.code == 1 and any(a.lstrip("-") in ("help", "helpshort", "helpfull", "?") for a in argv):
            sys.exit(0)
        raise


def run(main: Callable[[list[str]], None]) -> None:
    """``app.run(main)`` with :func:`parse_flags`."""
    app.run(main, flags_parser=parse_flags)


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


def compilation_cache_dir() -> Path:
    """Where compiled programs persist between runs: ``$JAX_COMPILATION_CACHE_DIR`` if set, else
    ``entropy_jax/jax`` in the user's cache folder (``$XDG_CACHE_HOME``, default ``~/.cache``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "entropy_jax" / "jax"


def enable_compilation_cache() -> Path:
    """JAX's persistent compilation cache at :func:`compilation_cache_dir`, keeping every program
    that took at least 0.1 s to compile (the demo's steps, probes and samplers: a second run loads
    them instead of compiling them again). An environment setting of either option wins."""
    path = compilation_cache_dir()
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path


def start(argv: list[str]) -> None:
    """What every entry point does first: reject stray arguments, join the multi-process
    runtime when launched on several hosts, set up logging and the persistent compilation cache."""
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}: flags are written --name=value")
    initialize_distributed()
    setup_logging()
    logging.debug("compilation cache: %s", enable_compilation_cache())


def apply_init_flags(cfg, init_from: str | None, init_step: int | None) -> None:
    """``--init_from`` / ``--init_step`` are ``config.init_from.workdir`` / ``.step``; both forms
    naming different parents (or steps) is refused, not settled silently."""
    given = cfg.init_from.workdir
    if init_from is not None and given and Path(given).expanduser().resolve() != Path(init_from).expanduser().resolve():
        raise UserError(f"--init_from={init_from} and --config.init_from.workdir={given} name different parents: "
                        "give one of them")
    if init_step is not None and cfg.init_from.step not in (-1, init_step):
        raise UserError(f"--init_step={init_step} and --config.init_from.step={cfg.init_from.step} differ: "
                        "give one of them")
    if init_from is not None:
        cfg.init_from.workdir = init_from
    if init_step is not None:
        cfg.init_from.step = init_step


def finished_result(wd: Workdir, step: int, meta: dict) -> train.TrainResult:
    """The result of a run whose latest checkpoint is its last step, read without writing anything."""
    rows = read_metrics(wd.metrics) if wd.metrics.exists() else []
    loss = rows[-1]["loss"] if rows and rows[-1]["step"] == step else None
    return train.TrainResult(wd.root, step, loss, meta.get("entropy_rate"), saved_steps(wd.root), step)


def train_with_probes(cfg, workdir) -> train.TrainResult:
    """Validate everything, then train, running the config's ``in_training`` probes at the probe
    steps (``train.probe_every``). A finished run is reported without being opened for writing."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir.from_flag(workdir)
    start = train.plan_start(validate.check_config(cfg), wd)
    if start.finished:
        return finished_result(wd, start.resume_step, start.resume_meta)
    check_writable(wd.root, "training")
    return train.run(start, on_probe_step=sweep.training_hook(cfg, wd.root))


def summarise_training(result) -> str:
    gap = ""
    if result.entropy_rate is not None and result.final_loss is not None:
        gap = (f" = entropy rate {result.entropy_rate:.4f} {result.final_loss - result.entropy_rate:+.4f}"
               " nats/token")
    loss = "n/a" if result.final_loss is None else f"{result.final_loss:.4f}"
    return (
        f"workdir: {result.workdir}\n"
        f"checkpoints: {len(result.checkpoint_steps)} in {Workdir(result.workdir).checkpoints} "
        f"(steps {result.checkpoint_steps[0]}..{result.checkpoint_steps[-1]})\n"
        f"metrics: {Workdir(result.workdir).metrics}\n"
        f"final loss (step {result.final_step}): {loss}{gap}"
    )
