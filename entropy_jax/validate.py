"""Check everything before writing: the checks that need more than one layer's knowledge.

Each check raises :class:`entropy_jax.errors.UserError` with one line naming the problem and the
fix; the entry points print it and exit with status 2 (see :mod:`entropy_jax.cli`). The checks
themselves live with what they check (the config sections in :mod:`entropy_jax.config`, a
workdir's resume in :mod:`entropy_jax.train.start`, a loss and a probe type in their registries);
this module only calls them in order.

    run = check_config(cfg)       # typed config; the loss and the probes by their registries; device count
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from entropy_jax.checkpoint import Checkpoints, saved_steps
from entropy_jax.config import DataConfig, ProbeSetConfig, RunConfig
from entropy_jax.data.builders import SYNTHETIC_KINDS
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import hf
from entropy_jax.sweep.evaluators import EVALUATORS
from entropy_jax.sweep.run import (
    check_probe_overrides,
    newest_readable_meta,
    probe_plan,
    probe_source,
    sweep_probe_set,
)
from entropy_jax.train.objective import make_loss
from entropy_jax.train.start import parent_checkpoint
from entropy_jax.workdir import Workdir, check_writable


def _check_probes(probes: Mapping[str, Any], probe_set: ProbeSetConfig) -> None:
    for name, entry in probes.items():
        entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
        kind = entry.get("type")
        if kind not in EVALUATORS:
            raise UserError(f"probes.{name}.type={kind!r} is not a probe type{did_you_mean(str(kind), EVALUATORS)} "
                            f"(registered: {', '.join(sorted(EVALUATORS))})")
        if kind == "representation":
            if entry.get("position", "last") not in ("last", "mean"):
                raise UserError(f"probes.{name}.position={entry['position']!r} must be 'last' or 'mean'")
            sigma = entry.get("dse_sigma", 0.0) or 0.0
            if not (math.isfinite(sigma) and sigma >= 0):
                raise UserError(f"probes.{name}.dse_sigma={sigma} must be >= 0 (0 = no diffusion spectral entropy)")
            fit = entry.get("alpha_fit_range")
            if fit is not None and not (len(fit) == 2 and 0 <= fit[0] < fit[1]):
                raise UserError(f"probes.{name}.alpha_fit_range={tuple(fit)} must be (start, stop) with "
                                "0 <= start < stop, or None")
        if kind == "attention" and not 1 <= int(entry.get("num_examples", 1)):
            raise UserError(f"probes.{name}.num_examples={entry['num_examples']} must be >= 1")


def check_probe_config(cfg: ml_collections.ConfigDict) -> ProbeSetConfig:
    """The ``probe_set`` and ``probes`` sections (also what ``probe.py --config`` uses)."""
    probe_set = ProbeSetConfig.from_dict(cfg.probe_set)
    _check_probes(cfg.probes.to_dict() if hasattr(cfg.probes, "to_dict") else cfg.probes, probe_set)
    return probe_set


def check_config(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> RunConfig:
    """The typed run config, after every check that needs only the config, the registries (losses,
    probe types) and the device count: raises UserError."""
    run = RunConfig.from_config(cfg)
    check_probe_config(cfg)
    try:
        make_loss(run.train.loss)
    except ValueError as e:
        raise UserError(str(e)) from e
    if run.init_from.workdir:
        parent_checkpoint(run.init_from)
    devices = jax.device_count() if device_count is None else device_count
    if run.train.batch_size % devices:
        raise UserError(f"train.batch_size={run.train.batch_size} is not divisible by the {devices} devices: use a "
                        f"multiple of {devices}, e.g. {max(devices, run.train.batch_size // devices * devices)}")
    return run


def check_probe_workdir(value: str | None, probe_config: ml_collections.ConfigDict | None) -> Path:
    """``probe.py``'s input: a run folder with checkpoints, and (if given) a probe config whose
    ``probes`` are valid and whose ``probe_set`` overrides (None: the run's own) fit the run. An
    override, or an imported model's text probe set, is built and checked against the probe set
    the workdir already holds (:func:`entropy_jax.sweep.run.sweep_probe_set`), writing nothing."""
    workdir = Workdir.from_flag(value).root
    if not workdir.is_dir():
        raise UserError(f"--workdir={value} does not exist: give a run folder written by experiments/pretrain.py")
    steps = saved_steps(workdir)
    if not steps:
        raise UserError(f"no checkpoints in {workdir / 'checkpoints'}: train first "
                        f"(experiments/pretrain.py --workdir={workdir})")
    with Checkpoints(workdir, read_only=True) as ckpts:
        meta = newest_readable_meta(ckpts, steps)
    if probe_config is not None and probe_config.get("probes") is not None:
        _check_probes(probe_config.probes.to_dict(), None)
    _, probe_set, overrides = probe_plan(meta, probe_config)
    check_probe_overrides(meta, overrides)
    source = probe_source(meta)
    num_sequences = overrides.get("num_sequences", probe_set.get("num_sequences"))
    num_val = source.get("data", {}).get("num_val", DataConfig.num_val)
    if source.get("data", {}).get("name") in SYNTHETIC_KINDS and num_sequences > num_val:
        raise UserError(f"probe_set.num_sequences={num_sequences} is larger than the run's validation "
                        f"split ({num_val} sequences)")
    if overrides or source.get("kind") == hf.probe_text.KIND:
        sweep_probe_set(Workdir(workdir), meta, probe_set, overrides)
    check_writable(Workdir(workdir).probes, "the probe sweep")
    return workdir
