"""How a training run starts, decided before anything is written: resume the workdir's own latest
checkpoint, else initialise from a parent checkpoint (``init_from``), else from scratch.

    start = plan_start(cfg, workdir)   # reads the workdir and the parent, opens the corpus once
    if not start.finished:
        train.run(start)

A resume must keep what fixes the saved state (:func:`resume_differences`: the model, the data's
content, the data stream, the optimiser state's structure) and the corpus's fingerprint; a
parent must have the same model. Each refusal is one :class:`~entropy_jax.errors.UserError`
naming the differences and the fix.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from entropy_jax import data
from entropy_jax.checkpoint import (
    ConfigMismatchError,
    corpus_differences,
    corpus_fingerprint,
    read_meta,
    saved_steps,
)
from entropy_jax.config import DataConfig, InitFromConfig, RunConfig, as_dict, check_split_sizes
from entropy_jax.data import data_dir_of, synthetic_params
from entropy_jax.data.builders import SYNTHETIC_KINDS
from entropy_jax.data.text import PUBLISHED_TEXT
from entropy_jax.errors import UserError
from entropy_jax.models import ModelConfig
from entropy_jax.workdir import Workdir


class MissingCheckpointError(UserError, FileNotFoundError):
    """The checkpoint a run should start from is not there."""



@dataclasses.dataclass(frozen=True)
class Difference:
    key: str  # dotted config key
    saved: Any
    now: Any
    why: str = ""

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.now!r}" + (f" ({self.why})" if self.why else "")


def _section(cfg: Mapping[str, Any], name: str) -> dict[str, Any]:
    return as_dict(cfg.get(name) or {})


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


def check_same_model(saved: dict, mcfg: ModelConfig, where: Path, step: int) -> None:
    """Refuse to start from a checkpoint whose model config differs, naming the differing keys."""
    ours = dataclasses.asdict(mcfg)
    diffs = [f"{k}: {saved.get(k)!r} (checkpoint) vs {ours.get(k)!r} (this config)"
             for k in sorted(set(saved) | set(ours)) if saved.get(k, ModelConfig.default(k)) != ours.get(k)]
    if diffs:
        raise ConfigMismatchError(
            f"cannot initialise from {where} step {step}: its model differs ({'; '.join(diffs)}). "
            "Use the parent's model config (e.g. the same --config preset)."
        )


@dataclasses.dataclass(frozen=True)
class Parent:
    """The checkpoint a stage starts from: its workdir, step and metadata."""

    workdir: Workdir
    step: int
    meta: dict


@dataclasses.dataclass(frozen=True)
class Start:
    """Where a run starts: the typed config (with the saved spelling of its data keys on a resume),
    the workdir, the latest own checkpoint (step and metadata) or the parent, and the opened corpus
    (None for a finished run, which needs none)."""

    config: RunConfig
    workdir: Workdir
    resume_step: int | None = None
    resume_meta: dict | None = None
    parent: Parent | None = None
    corpus: Any = None

    @property
    def finished(self) -> bool:
        return self.resume_step is not None and self.resume_step >= self.config.train.steps


def _resume(cfg: RunConfig, wd: Workdir, steps: list[int]) -> Start:
    meta = read_meta(wd, steps[-1])
    saved = meta["config"]
    diffs = resume_differences(saved, cfg.raw)
    if diffs:
        raise ConfigMismatchError(resume_mismatch_message(wd.checkpoints, steps[-1], diffs))
    if cfg.train.steps < steps[-1]:
        raise UserError(f"train.steps={cfg.train.steps} is below the latest checkpoint in {wd} "
                        f"(step {steps[-1]}): give train.steps >= {steps[-1]} to continue that run, or use a "
                        "new --workdir")
    return Start(_saved_spelling(cfg, saved), wd, steps[-1], meta)


def _saved_spelling(cfg: RunConfig, saved: Mapping[str, Any]) -> RunConfig:
    """``cfg`` with the saved values of the keys that only spell the same data differently
    (``data.download``, a data or text folder written another way), so the run keeps its saved config."""
    saved_data, seq_len = saved.get("data", {}), cfg.train.seq_len
    if data_identity(saved_data, seq_len) != data_identity(cfg.raw["data"], seq_len):
        return cfg
    keys = {k: saved_data[k] for k in ("download", "data_dir", "text_dir")
            if k in saved_data and k in cfg.raw["data"] and cfg.raw["data"][k] != saved_data[k]}
    return cfg.with_data(**keys) if keys else cfg


def parent_checkpoint(init_from: InitFromConfig) -> tuple[Workdir, int]:
    """The parent workdir and step ``init_from`` names (step -1: its latest); MissingCheckpointError
    when it holds no checkpoints or not that step."""
    parent_dir, step = init_from.workdir, init_from.step
    wd = Workdir(Path(parent_dir).expanduser())
    steps = saved_steps(wd)
    if not steps:
        raise MissingCheckpointError(f"init_from.workdir={parent_dir} holds no checkpoints in {wd.checkpoints}: "
                                     "give a trained run's folder")
    step = steps[-1] if step < 0 else step
    if step not in steps:
        raise MissingCheckpointError(f"init_from.step={step} is not a checkpoint of {parent_dir}; "
                                     f"saved steps: {steps}")
    return wd, step


def _parent(cfg: RunConfig) -> Parent:
    wd, step = parent_checkpoint(cfg.init_from)
    meta = read_meta(wd, step)
    check_same_model(meta["model_config"], cfg.model, wd.checkpoints, step)
    return Parent(wd, step, meta)


def _check_corpus(start: Start, corpus: Any) -> None:
    """A resumed run's corpus must have the saved content; every corpus must fit the batch and probe set."""
    saved = start.resume_meta or {}
    if "corpus" in saved or "corpus_fingerprint" in saved:
        saved_corpus = saved.get("corpus_fingerprint") or corpus_fingerprint(saved["corpus"])
        diffs = corpus_differences(saved_corpus, corpus_fingerprint(corpus.info))
        if diffs:
            raise ConfigMismatchError(
                f"{start.workdir.checkpoints} holds checkpoints (latest step {start.resume_step}) of a different "
                "config or corpus: " + "; ".join(diffs) + ". To resume that run, rerun with its saved config (in "
                f"checkpoint {start.resume_step}'s meta) and corpus; to start another run, use a new --workdir."
            )
    cfg = start.config
    if not cfg.data.synthetic:  # synthetic sizes are fixed by the config and checked with it
        check_split_sizes(len(corpus.train), len(corpus.validation), cfg.train, cfg.probe_set)
    if corpus.vocab_size != cfg.model.vocab_size:
        raise UserError(f"the corpus has {corpus.vocab_size} tokens but the model config {cfg.model.vocab_size}")


def plan_start(cfg: Any, workdir: str | os.PathLike) -> Start:
    """Where the run of ``cfg`` (a ConfigDict or a :class:`RunConfig`) in ``workdir`` starts, every
    check done and the corpus opened (prepared on first use, in its data folder); writes nothing
    in the workdir. Raises UserError (ConfigMismatchError, MissingCheckpointError) naming the fix."""
    run_cfg, wd = RunConfig.from_config(cfg), Workdir(workdir)
    steps = saved_steps(wd)
    if steps:
        start = _resume(run_cfg, wd, steps)
    elif run_cfg.init_from.workdir:
        start = Start(run_cfg, wd, parent=_parent(run_cfg))
    else:
        start = Start(run_cfg, wd)
    if start.finished:
        return start
    corpus = data.load_corpus(start.config.raw["data"], start.config.train.seq_len)
    _check_corpus(start, corpus)
    return dataclasses.replace(start, corpus=corpus)
