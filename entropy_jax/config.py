"""The run config, typed once at the boundary: frozen views of its sections and the whole.

    run = RunConfig.from_config(cfg)   # UserError naming the key: unknown keys (with did-you-mean),
    run.train.batch_size, run.model    # wrong types, values out of range, sections that disagree

Each section (``data``, ``train``, ``checkpoint``, ``probe_set``, ``init_from``; the model is
:class:`entropy_jax.models.ModelConfig`) is a frozen dataclass built from a ConfigDict or the
plain dict saved in a checkpoint. Checks here need nothing but the config; checks against the
machine (the device count) or a registry of a higher layer (losses, probe types) are in
:mod:`entropy_jax.validate`, and checks against a workdir in :mod:`entropy_jax.train.start`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Self, TypeVar

import jax

from entropy_jax.data import VALID_NAMES
from entropy_jax.data.builders import SYNTHETIC_KINDS, SyntheticParams
from entropy_jax.data.text import text_files
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import ModelConfig
from entropy_jax.models.build import ARCHITECTURES

# The stages a checkpoint can be tagged with (a lineage: pretrain, then fine-tuning or post-training).
STAGES = ("pretrain", "finetune", "sft", "dpo", "rlvr")

C = TypeVar("C")


def as_dict(section: Any) -> dict[str, Any]:
    """A config section (ConfigDict or mapping) as a plain dict."""
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def _typed(value: Any, kind: str, key: str) -> Any:
    """``value`` as the annotated type ``kind`` (int, float, bool, str, dict), or a UserError."""
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "dict": isinstance(value, Mapping) or hasattr(value, "to_dict")}[kind]
    if not ok:
        raise UserError(f"{key}={value!r} is a {type(value).__name__}; it must be a {kind}")
    return float(value) if kind == "float" else as_dict(value) if kind == "dict" else value


def _from_dict(cls: type[C], section: Any, prefix: str) -> C:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in as_dict(section).items():
        if key not in known:
            raise UserError(f"unknown config key {prefix}.{key}{did_you_mean(key, known)} "
                            f"(valid keys: {', '.join(known)})")
        values[key] = _typed(value, str(known[key].type), f"{prefix}.{key}")
    return cls(**values)


class _Section:
    """A config section: ``from_dict`` builds it from a ConfigDict or dict, naming ``PREFIX.key``
    in every refusal (unknown keys with did-you-mean, wrong types, values out of range)."""

    PREFIX: ClassVar[str]

    @classmethod
    def from_dict(cls, section: Any) -> Self:
        return _from_dict(cls, section, cls.PREFIX)


def _raise(problems: list[str]) -> None:
    if problems:
        raise UserError("; ".join(problems))


def _at_least(problems: list[str], key: str, value: float, low: float, meaning: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        problems.append(f"{key}={value} must be >= {low:g}" + (f" ({meaning})" if meaning else ""))


_SYNTHETIC = SyntheticParams()  # the data layer's defaults: what a key missing from a saved config meant


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """``config.data``: which corpus (see :func:`entropy_jax.data.load_corpus`). Defaults are the
    data layer's own, i.e. what a key missing from an older saved config meant."""

    PREFIX: ClassVar[str] = "data"

    name: str = _SYNTHETIC.kind
    vocab_size: int = _SYNTHETIC.vocab_size
    zipf_exponent: float = _SYNTHETIC.zipf_exponent
    order: int = _SYNTHETIC.order
    successors: int = _SYNTHETIC.successors
    num_topics: int = _SYNTHETIC.num_topics
    uniform: bool = _SYNTHETIC.uniform
    num_train: int = _SYNTHETIC.num_train
    num_val: int = _SYNTHETIC.num_val
    data_seed: int = _SYNTHETIC.seed
    data_dir: str = ""
    text_dir: str = ""
    download: bool = True
    stored_seq_len: int = 0
    task: str = "lookup"  # name="tasks" (entropy_jax.data.tasks): which task, its size, the training split
    task_size: int = 4
    split: str = "sft"
    corpus_seed: int = 0  # task="fact": the data_seed of the assoc_pairs corpus whose facts are asked
    heldout_keys: int = 256  # task="fact": frequent keys held out as the validation split

    def __post_init__(self):
        if self.name not in VALID_NAMES:
            raise UserError(f"data.name={self.name!r} is not a corpus{did_you_mean(self.name, VALID_NAMES)} "
                            f"(valid: {', '.join(VALID_NAMES)})")
        problems: list[str] = []
        if self.synthetic:
            _at_least(problems, "data.vocab_size", self.vocab_size, 2)
            _at_least(problems, "data.zipf_exponent", self.zipf_exponent, 0)
            _at_least(problems, "data.num_train", self.num_train, 1, "training sequences")
            _at_least(problems, "data.num_val", self.num_val, 1, "validation sequences")
            _at_least(problems, "data.stored_seq_len", self.stored_seq_len, 0, "0 = train.seq_len")
            if self.name != "assoc_pairs":
                if not 1 <= self.order <= 3:
                    problems.append(f"data.order={self.order} must be 1, 2 or 3")
                if not 3 <= self.successors <= self.vocab_size:
                    problems.append(f"data.successors={self.successors} must be in 3..data.vocab_size="
                                    f"{self.vocab_size}")
            if self.name == "markov_mixture":
                _at_least(problems, "data.num_topics", self.num_topics, 1)
        elif self.name == "text_folder" and not self.text_dir:
            problems.append("data.name='text_folder' needs data.text_dir, a folder of .txt/.md/.py files")
        _raise(problems)

    @property
    def synthetic(self) -> bool:
        return self.name in SYNTHETIC_KINDS

    @property
    def model_vocab_size(self) -> int:
        """The vocabulary a model of this data has: ``vocab_size`` for the synthetic corpora and the
        tasks (which share their pretraining vocabulary), 256 for the byte-level text corpora."""
        return self.vocab_size if self.synthetic or self.name == "tasks" else 256


@dataclasses.dataclass(frozen=True)
class TrainConfig(_Section):
    """``config.train``: optimiser, schedule, batch and logging (see entropy_jax.train)."""

    PREFIX: ClassVar[str] = "train"

    steps: int = 3_000
    batch_size: int = 32
    seq_len: int = 64
    lr: float = 3e-3
    warmup_steps: int = 150
    end_lr: float = 3e-4
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0
    log_every: int = 1
    steps_per_call: int = 1  # optimiser steps per jitted call (a lax.scan); checkpoints end a call
    loss: dict = dataclasses.field(default_factory=lambda: {"name": "next_token"})
    probe_every: int = -1
    tensorboard: bool = False
    kappatune: int = 0  # > 0: train only this many lowest-condition-number matrices (KappaTune)

    def __post_init__(self):
        problems: list[str] = []
        _at_least(problems, "train.steps", self.steps, 1, "optimiser steps to train to")
        _at_least(problems, "train.batch_size", self.batch_size, 1, "global sequences per step")
        _at_least(problems, "train.seq_len", self.seq_len, 1, "tokens per sequence")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"train.lr={self.lr} must be a positive number")
        _at_least(problems, "train.warmup_steps", self.warmup_steps, 0)
        _at_least(problems, "train.end_lr", self.end_lr, 0)
        _at_least(problems, "train.weight_decay", self.weight_decay, 0)
        for key, beta in (("train.b1", self.b1), ("train.b2", self.b2)):
            if not 0 <= beta < 1:
                problems.append(f"{key}={beta} must be in [0, 1)")
        _at_least(problems, "train.grad_clip", self.grad_clip, 0, "0 disables clipping")
        _at_least(problems, "train.log_every", self.log_every, 1, "steps between rows of metrics.jsonl")
        _at_least(problems, "train.steps_per_call", self.steps_per_call, 1, "optimiser steps per jitted call")
        _at_least(problems, "train.probe_every", self.probe_every, -1, "-1 every checkpoint, 0 never, N every N")
        _at_least(problems, "train.kappatune", self.kappatune, 0, "0 trains every matrix")
        if not isinstance(self.loss.get("name"), str):
            problems.append(f"train.loss={self.loss} needs a name (e.g. dict(name='next_token'))")
        _raise(problems)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.loss.items())) + (self.steps, self.batch_size, self.seq_len, self.lr))


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(_Section):
    """``config.checkpoint``: the log-spaced save schedule (entropy_jax.checkpoint.is_save_step)."""

    PREFIX: ClassVar[str] = "checkpoint"

    dense_until: int = 512
    every: int = 1_000
    max_to_keep: int = 0

    def __post_init__(self):
        problems: list[str] = []
        _at_least(problems, "checkpoint.dense_until", self.dense_until, 0)
        _at_least(problems, "checkpoint.every", self.every, 0, "0 = only the powers of two and the last step")
        _at_least(problems, "checkpoint.max_to_keep", self.max_to_keep, 0, "0 keeps all")
        _raise(problems)


@dataclasses.dataclass(frozen=True)
class ProbeSetConfig(_Section):
    """``config.probe_set``: how many fixed validation sequences the probes see, and the forward batch."""

    PREFIX: ClassVar[str] = "probe_set"

    num_sequences: int = 1_024
    batch_size: int = 256

    def __post_init__(self):
        problems: list[str] = []
        _at_least(problems, "probe_set.num_sequences", self.num_sequences, 1)
        _at_least(problems, "probe_set.batch_size", self.batch_size, 1)
        _raise(problems)


@dataclasses.dataclass(frozen=True)
class InitFromConfig(_Section):
    """``config.init_from``: the parent checkpoint a fine-tuning stage starts from ("" = scratch)."""

    PREFIX: ClassVar[str] = "init_from"

    workdir: str = ""
    step: int = -1  # -1 = the parent's latest checkpoint

    def __post_init__(self):
        if self.step < -1:
            raise UserError(f"init_from.step={self.step!r} must be a checkpoint step, or -1 for the latest")


MODEL_MINIMA = {"d_model": 1, "num_layers": 1, "num_heads": 1, "d_ff": 0}


def model_section(model: Mapping[str, Any], vocab_size: int, seq_len: int) -> ModelConfig:
    """``config.model`` plus what the data decides (vocabulary, context), as a ModelConfig; UserError
    naming the key for a non-integer size, an unregistered architecture, an unknown key or a shape
    the model refuses (heads not dividing the width, say)."""
    model = as_dict(model)
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


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole training run's config, typed: what training reads. ``raw`` is the config as given
    (a plain dict), saved in every checkpoint's metadata and read by the probes of its sections
    (``probes``) that belong to the sweep."""

    seed: int
    stage: str
    data: DataConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    probe_set: ProbeSetConfig
    init_from: InitFromConfig
    model: ModelConfig
    raw: dict = dataclasses.field(repr=False, compare=False)

    @classmethod
    def from_config(cls, cfg: Any) -> RunConfig:
        """Type and check every section of ``cfg`` (a ConfigDict or dict); a RunConfig passes through."""
        if isinstance(cfg, RunConfig):
            return cfg
        raw = as_dict(cfg)
        seed, stage = raw.get("seed"), raw.get("stage")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"seed={seed!r} must be an integer")
        if stage not in STAGES:
            raise UserError(f"stage={stage!r} is not a known stage{did_you_mean(str(stage), STAGES)} "
                            f"(stages: {', '.join(STAGES)})")
        data, train = DataConfig.from_dict(raw["data"]), TrainConfig.from_dict(raw["train"])
        probe_set = ProbeSetConfig.from_dict(raw["probe_set"])
        _check_data_against_train(data, train, probe_set)
        return cls(seed=seed, stage=stage, data=data, train=train,
                   checkpoint=CheckpointConfig.from_dict(raw["checkpoint"]), probe_set=probe_set,
                   init_from=InitFromConfig.from_dict(raw.get("init_from", {})),
                   model=model_section(raw["model"], data.model_vocab_size, train.seq_len), raw=raw)

    def with_data(self, **keys: Any) -> RunConfig:
        """The same run with ``data`` keys replaced (in the typed section and in ``raw``)."""
        raw = {**self.raw, "data": {**self.raw["data"], **keys}}
        return dataclasses.replace(self, data=dataclasses.replace(self.data, **keys), raw=raw)


def _check_data_against_train(d: DataConfig, train: TrainConfig, probe_set: ProbeSetConfig) -> None:
    """Sizes that the config alone fixes for synthetic corpora (a text corpus's sizes are known
    once it is prepared, and :mod:`entropy_jax.train.start` checks them then)."""
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
    check_split_sizes(d.num_train, d.num_val, train, probe_set)


def check_split_sizes(num_train: int, num_val: int, train: TrainConfig, probe_set: ProbeSetConfig) -> None:
    """The probe set fits the validation split and a batch fits each process's share of the training split."""
    num_processes = jax.process_count()
    if probe_set.num_sequences > num_val:
        raise UserError(f"probe_set.num_sequences={probe_set.num_sequences} is larger than the validation split "
                        f"({num_val} sequences): lower it or raise data.num_val")
    if num_train // num_processes < train.batch_size // num_processes:
        raise UserError(f"the training split has {num_train} sequences, fewer than one batch "
                        f"(train.batch_size={train.batch_size})")
