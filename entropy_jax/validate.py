"""Check a whole run configuration, a workdir and a plot request before anything is written.

Each check raises :class:`entropy_jax.errors.UserError` with one line naming the problem and the
fix; the entry points print it and exit with status 2 (see :mod:`entropy_jax.cli`).

    check_config(cfg)                       # types, ranges, registries, device count, data vs probe set
    workdir = workdir_path(flags.workdir)   # not empty, not a file
    latest = check_resume(cfg, workdir)     # same model / data / optimiser structure as the saved run
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections

from entropy_jax import data
from entropy_jax.analysis.plots import default_probe
from entropy_jax.analysis.results import load_results
from entropy_jax.checkpoint import Checkpoints, saved_steps
from entropy_jax.config import (
    CheckpointConfig,
    DataConfig,
    ProbeSetConfig,
    TrainConfig,
    data_identity,
    resume_differences,
    resume_mismatch_message,
)
from entropy_jax.data.text import text_files
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import ModelConfig
from entropy_jax.models.build import ARCHITECTURES
from entropy_jax.sweep.probe_set import check_probe_config, check_probe_run
from entropy_jax.train.losses import make_loss
from entropy_jax.workdir import Workdir

MODEL_MINIMA = {"d_model": 1, "num_layers": 1, "num_heads": 1, "d_ff": 0}


def _check_model(model: Mapping[str, Any], vocab_size: int, seq_len: int) -> ModelConfig:
    for key, low in MODEL_MINIMA.items():
        value = model.get(key, ModelConfig.default(key))
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"model.{key}={value!r} must be an integer >= {low}")
    arch = model.get("arch", "transformer")
    if arch not in ARCHITECTURES:
        raise UserError(f"model.arch={arch!r} is not registered{did_you_mean(arch, ARCHITECTURES)} "
                        f"(registered: {', '.join(sorted(ARCHITECTURES))})")
    unknown = sorted(set(model) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise UserError(f"unknown config key model.{unknown[0]}"
                        f"{did_you_mean(unknown[0], ModelConfig.__dataclass_fields__)}")
    try:  # ModelConfig checks divisibility and the choice fields with ValueError: input errors here
        return ModelConfig.from_dict({**model, "vocab_size": vocab_size, "max_len": seq_len})
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from e


def _check_data_against_train(d: DataConfig, train: TrainConfig, probe_set: ProbeSetConfig) -> None:
    """Sizes that the config alone fixes for synthetic corpora (text: :func:`check_corpus_sizes`)."""
    if not d.synthetic:
        if d.name == "text_folder":
            try:
                text_files(d.text_dir)
            except FileNotFoundError as e:
                raise UserError(str(e)) from e
        return
    stored = d.stored_seq_len or train.seq_len
    if stored < train.seq_len:
        raise UserError(f"data.stored_seq_len={stored} is shorter than train.seq_len={train.seq_len}")
    if d.name == "assoc_pairs" and stored % 2:
        raise UserError(f"assoc_pairs needs an even sequence length; train.seq_len={train.seq_len} is odd")
    _check_sizes(d.num_train, d.num_val, train, probe_set)


def _check_sizes(num_train: int, num_val: int, train: TrainConfig, probe_set: ProbeSetConfig) -> None:
    if probe_set.num_sequences > num_val:
        raise UserError(f"probe_set.num_sequences={probe_set.num_sequences} is larger than the validation split "
                        f"({num_val} sequences): lower it or raise data.num_val")
    per_process = num_train // jax.process_count()
    if per_process < train.batch_size // jax.process_count():
        raise UserError(f"the training split has {num_train} sequences, fewer than one batch "
                        f"(train.batch_size={train.batch_size})")


def check_corpus_sizes(cfg: ml_collections.ConfigDict) -> None:
    """For text corpora, whose sizes only the prepared files know: open the corpus (preparing it
    once, as training would) and compare the splits with the batch and the probe set."""
    if DataConfig.from_dict(cfg.data).synthetic:
        return
    corpus = data.load_corpus(cfg.data, cfg.train.seq_len)
    _check_sizes(len(corpus.train), len(corpus.validation), TrainConfig.from_dict(cfg.train),
                 ProbeSetConfig.from_dict(cfg.probe_set))


def _check_init_from(init_from: Mapping[str, Any]) -> None:
    parent, step = init_from.get("workdir", ""), init_from.get("step", -1)
    if not isinstance(step, int) or step < -1:
        raise UserError(f"init_from.step={step!r} must be a checkpoint step, or -1 for the latest")
    if not parent:
        return
    steps = saved_steps(Path(parent).expanduser())
    if not steps:
        raise UserError(f"init_from.workdir={parent} holds no checkpoints: give a trained run's folder")
    if step >= 0 and step not in steps:
        raise UserError(f"init_from.step={step} is not a checkpoint of {parent}; saved steps: {steps}")


def check_config(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Every check that needs only the config (and the device count): raises UserError."""
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise UserError(f"seed={cfg.get('seed')!r} must be an integer")
    if not isinstance(cfg.get("stage"), str) or not cfg.stage:
        raise UserError(f"stage={cfg.get('stage')!r} must be a name such as 'pretrain' or 'finetune'")
    d, train = DataConfig.from_dict(cfg.data), TrainConfig.from_dict(cfg.train)
    CheckpointConfig.from_dict(cfg.checkpoint)
    probe_set = check_probe_config(cfg)
    _check_model(cfg.model.to_dict(), d.model_vocab_size, train.seq_len)
    try:
        make_loss(train.loss)
    except ValueError as e:
        raise UserError(str(e)) from e
    devices = jax.device_count() if device_count is None else device_count
    if train.batch_size % devices:
        raise UserError(f"train.batch_size={train.batch_size} is not divisible by the {devices} devices: use a "
                        f"multiple of {devices}, e.g. {max(devices, train.batch_size // devices * devices)}")
    _check_data_against_train(d, train, probe_set)
    _check_init_from(cfg.init_from.to_dict())


# ---------------------------------------------------------------------------------------------
# Workdirs.


def workdir_path(value: str | os.PathLike | None, flag: str = "--workdir") -> Path:
    """The workdir as an absolute path: refused when empty (it would be the current folder) or a file."""
    if value is None or not str(value).strip():
        raise UserError(f"{flag} is empty: name the run's folder, e.g. {flag}=runs/demo")
    path = Path(value).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}={value} is a file, not a folder: name a folder (new or a run's)")
    return path


def check_writable(path: Path, what: str) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing parent) must accept new files."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK if existing.is_dir() else os.W_OK):
        raise UserError(f"{existing} is read-only, but {what} writes there: make it writable or use another "
                        "--workdir")


def check_resume(cfg: ml_collections.ConfigDict, workdir: Path) -> tuple[int, dict] | None:
    """If ``workdir`` holds checkpoints: (latest step, its meta), after checking that ``cfg`` can
    resume them (same model, data content, data stream and optimiser structure, and train.steps
    not below the latest step). Keys that only spell the same data differently (``data.download``,
    ``data.data_dir`` / ``text_dir`` written another way) are set back to the saved values, so
    the training loop sees the saved config there."""
    steps = saved_steps(workdir)
    if not steps:
        return None
    with Checkpoints(workdir, read_only=True) as ckpts:
        meta = ckpts.read_meta(steps[-1])
    saved = meta["config"]
    diffs = resume_differences(saved, cfg.to_dict())
    if diffs:
        raise UserError(resume_mismatch_message(workdir / "checkpoints", steps[-1], diffs))
    if cfg.train.steps < steps[-1]:
        raise UserError(f"train.steps={cfg.train.steps} is below the latest checkpoint in {workdir} "
                        f"(step {steps[-1]}): give train.steps >= {steps[-1]} to continue that run, or use a "
                        "new --workdir")
    _keep_saved_spelling(cfg, saved)
    return steps[-1], meta


def _keep_saved_spelling(cfg: ml_collections.ConfigDict, saved: Mapping[str, Any]) -> None:
    saved_data = saved.get("data", {})
    if data_identity(saved_data, cfg.train.seq_len) != data_identity(cfg.data.to_dict(), cfg.train.seq_len):
        return
    for key in ("download", "data_dir", "text_dir"):
        if key in saved_data and key in cfg.data and cfg.data[key] != saved_data[key]:
            cfg.data[key] = saved_data[key]


def check_probe_workdir(value: str | None, probe_config: ml_collections.ConfigDict | None) -> Path:
    """``probe.py``'s input: an existing folder holding a run the sweep can read with
    ``probe_config`` (:func:`entropy_jax.sweep.probe_set.check_probe_run`), its probes/ writable."""
    workdir = workdir_path(value)
    if not workdir.is_dir():
        raise UserError(f"--workdir={value} does not exist: give a run folder written by experiments/pretrain.py")
    wd = Workdir(workdir)
    check_probe_run(wd, probe_config)
    check_writable(wd.probes, "the probe sweep")
    return workdir


def check_plot_request(value: str | None, probe: str | None, layer: int | None) -> Path:
    """``plot.py``'s input: a run folder with a results table holding ``probe`` at ``layer``."""
    workdir = workdir_path(value)
    if not workdir.is_dir():
        raise UserError(f"workdir {workdir} does not exist: give a run folder (experiments/pretrain.py --workdir)")
    wd = Workdir(workdir)
    if not wd.results.exists():
        raise UserError(f"no results table at {wd.results}: run experiments/probe.py --workdir={workdir} first")
    table = load_results(workdir)
    probes = sorted(table["probe"].unique())
    if probe is not None and probe not in probes:
        raise UserError(f"--probe={probe} has no rows in {wd.results}{did_you_mean(probe, probes)} "
                        f"(probes: {', '.join(probes)})")
    if layer is not None:
        try:
            name = probe or default_probe(table)
        except ValueError as e:
            raise UserError(f"{e}: run experiments/probe.py with a representation probe first") from e
        layers = sorted(int(x) for x in table.loc[table["probe"] == name, "layer"].unique() if x >= 0)
        if layer not in layers:
            raise UserError(f"--layer={layer} is not a layer of probe {name!r} (layers: "
                            f"{', '.join(map(str, layers))})")
    check_writable(wd.plots, "plot.py")
    check_writable(wd.phases, "plot.py (probes/phases.csv)")
    return workdir
