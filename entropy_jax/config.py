"""Typed, frozen views of the ``data``, ``train``, ``checkpoint`` and ``probe_set`` config sections,
and the resume check: which saved settings a run must keep to continue in the same workdir.

    train = TrainConfig.from_dict(cfg.train)   # UserError naming the key for unknown keys, wrong
    data = DataConfig.from_dict(cfg.data)      # types and values out of range (all in one line)

Like :class:`entropy_jax.models.ModelConfig`, each is built once at the boundary from a
ConfigDict (or the plain dict saved in a checkpoint) and is hashable. Checks here need nothing
but the section itself; checks across sections or against the machine (batch divisible by the
device count, probe set no larger than the validation split) live in
:mod:`entropy_jax.validate`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from entropy_jax.data import VALID_NAMES, data_dir_of, synthetic_params
from entropy_jax.data.builders import SYNTHETIC_KINDS, SyntheticParams
from entropy_jax.data.text import PUBLISHED_TEXT
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import ModelConfig

C = TypeVar("C")


def _as_dict(section: Any) -> dict[str, Any]:
    return dict(section.to_dict() if hasattr(section, "to_dict") else section)


def _typed(value: Any, kind: str, key: str) -> Any:
    """``value`` as the annotated type ``kind`` (int, float, bool, str, dict), or a UserError."""
    ok = {"int": isinstance(value, int) and not isinstance(value, bool),
          "float": isinstance(value, (int, float)) and not isinstance(value, bool),
          "bool": isinstance(value, bool), "str": isinstance(value, str),
          "dict": isinstance(value, Mapping) or hasattr(value, "to_dict")}[kind]
    if not ok:
        raise UserError(f"{key}={value!r} is a {type(value).__name__}; it must be a {kind}")
    return float(value) if kind == "float" else _as_dict(value) if kind == "dict" else value


def _from_dict(cls: type[C], section: Any, prefix: str) -> C:
    known = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in _as_dict(section).items():
        if key not in known:
            raise UserError(f"unknown config key {prefix}.{key}{did_you_mean(key, known)} "
                            f"(valid keys: {', '.join(known)})")
        values[key] = _typed(value, str(known[key].type), f"{prefix}.{key}")
    return cls(**values)


def _raise(problems: list[str]) -> None:
    if problems:
        raise UserError("; ".join(problems))


def _at_least(problems: list[str], key: str, value: float, low: float, meaning: str = "") -> None:
    if not (math.isfinite(value) and value >= low):
        problems.append(f"{key}={value} must be >= {low:g}" + (f" ({meaning})" if meaning else ""))


_SYNTHETIC = SyntheticParams()  # the data layer's defaults: what a key missing from a saved config meant


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``config.data``: which corpus (see :func:`entropy_jax.data.load_corpus`). Defaults are the
    data layer's own, i.e. what a key missing from an older saved config meant."""

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

    @classmethod
    def from_dict(cls, section: Any) -> DataConfig:
        return _from_dict(cls, section, "data")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """``config.train``: optimiser, schedule, batch and logging (see entropy_jax.train)."""

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
        _at_least(problems, "train.probe_every", self.probe_every, -1, "-1 every checkpoint, 0 never, N every N")
        _at_least(problems, "train.kappatune", self.kappatune, 0, "0 trains every matrix")
        if not isinstance(self.loss.get("name"), str):
            problems.append(f"train.loss={self.loss} needs a name (e.g. dict(name='next_token'))")
        _raise(problems)

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.loss.items())) + (self.steps, self.batch_size, self.seq_len, self.lr))

    @classmethod
    def from_dict(cls, section: Any) -> TrainConfig:
        return _from_dict(cls, section, "train")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """``config.checkpoint``: the log-spaced save schedule (entropy_jax.checkpoint.is_save_step)."""

    dense_until: int = 512
    every: int = 1_000
    max_to_keep: int = 0

    def __post_init__(self):
        problems: list[str] = []
        _at_least(problems, "checkpoint.dense_until", self.dense_until, 0)
        _at_least(problems, "checkpoint.every", self.every, 0, "0 = only the powers of two and the last step")
        _at_least(problems, "checkpoint.max_to_keep", self.max_to_keep, 0, "0 keeps all")
        _raise(problems)

    @classmethod
    def from_dict(cls, section: Any) -> CheckpointConfig:
        return _from_dict(cls, section, "checkpoint")


@dataclasses.dataclass(frozen=True)
class ProbeSetConfig:
    """``config.probe_set``: how many fixed validation sequences the probes see, and the forward batch."""

    num_sequences: int = 1_024
    batch_size: int = 256

    def __post_init__(self):
        problems: list[str] = []
        _at_least(problems, "probe_set.num_sequences", self.num_sequences, 1)
        _at_least(problems, "probe_set.batch_size", self.batch_size, 1)
        _raise(problems)

    @classmethod
    def from_dict(cls, section: Any) -> ProbeSetConfig:
        return _from_dict(cls, section, "probe_set")


# ---------------------------------------------------------------------------------------------
# Resume: what must match between a workdir's saved config and the config of the rerun.


@dataclasses.dataclass(frozen=True)
class Difference:
    key: str  # dotted config key
    saved: Any
    now: Any
    why: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.now!r}" + (f" ({self.why})" if self.why else "")


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = cfg.get(name) or {}
    return _as_dict(value)


def _resolved(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path)) if path else ""


def data_identity(data: Mapping[str, Any], seq_len: int) -> dict[str, Any]:
    """What fixes a corpus's content, by config key: the parameters its builder uses (synthetic:
    those that change the data of its kind) and the resolved folders. ``data.download`` and the
    spelling of a path (``~``, relative, the TFDS default written out) are not part of it."""
    out: dict[str, Any] = {"name": data.get("name", DataConfig.name),
                           "data_dir": _resolved(data_dir_of(data))}
    if out["name"] in SYNTHETIC_KINDS:
        relevant = synthetic_params(data, seq_len).relevant()
        names = {"kind": None, "seq_len": None, "seed": "data_seed"}
        out |= {names.get(k, k): v for k, v in relevant.items() if names.get(k, k)}
        out["stored_seq_len"] = int(data.get("stored_seq_len", 0) or 0)
    elif out["name"] == "text_folder":
        out["text_dir"] = _resolved(str(data.get("text_dir", "")))
    elif out["name"] not in PUBLISHED_TEXT:  # generated corpora: every key but the download switch
        out |= {k: v for k, v in data.items() if k not in ("download", "data_dir", "text_dir", "name")}
    return out


def resume_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[Difference]:
    """The differences between a saved config and the current one that forbid resuming.

    What matters: the model (every key; a key missing from an older save means the ModelConfig
    default), the data's content (:func:`data_identity`), the data stream (``seed``,
    ``train.batch_size``, ``train.seq_len``) and the optimiser state's structure (clipping on or
    off: ``train.grad_clip`` > 0 adds a chain element). Everything else (steps, schedule, logging,
    checkpoint schedule, probes, the values of lr, betas, weight decay and clip norm) may change.
    """
    diffs: list[Difference] = []
    if saved.get("seed") != current.get("seed"):
        diffs.append(Difference("seed", saved.get("seed"), current.get("seed"), "initialisation and data order"))
    sm, cm = _section(saved, "model"), _section(current, "model")
    for k in sorted(set(sm) | set(cm)):
        a, b = sm.get(k, ModelConfig.default(k)), cm.get(k, ModelConfig.default(k))
        if a != b:
            diffs.append(Difference(f"model.{k}", a, b))
    st, ct = _section(saved, "train"), _section(current, "train")
    for k in ("batch_size", "seq_len"):
        if st.get(k) != ct.get(k):
            diffs.append(Difference(f"train.{k}", st.get(k), ct.get(k), "the data stream"))
    sd = data_identity(_section(saved, "data"), int(st.get("seq_len", 0) or 0))
    cd = data_identity(_section(current, "data"), int(ct.get("seq_len", 0) or 0))
    for k in sorted(set(sd) | set(cd)):
        if sd.get(k) != cd.get(k):
            raw = {"data_dir": "data_dir", "text_dir": "text_dir"}.get(k)
            a = _section(saved, "data").get(raw) if raw else sd.get(k)
            b = _section(current, "data").get(raw) if raw else cd.get(k)
            diffs.append(Difference(f"data.{k}", a, b, "the corpus"))
    a, b = float(st.get("grad_clip", 0) or 0), float(ct.get("grad_clip", 0) or 0)
    if (a > 0) != (b > 0):
        diffs.append(Difference("train.grad_clip", a, b, "clipping on/off changes the optimiser state"))
    return diffs


def resume_mismatch_message(directory: Any, step: int, diffs: list[Difference]) -> str:
    """One line: where, which keys differ, and that rerunning with the saved values resumes."""
    flags = " ".join(f"--config.{d.key}={d.saved}" for d in diffs if not isinstance(d.saved, (dict, list)))
    return (f"{directory} holds checkpoints (latest step {step}) of a different config: "
            + "; ".join(map(str, diffs))
            + f". To resume that run, rerun with its saved config (in checkpoint {step}'s meta)"
            + (f", i.e. add {flags}" if flags else "") + "; to start another run, use a new --workdir.")
