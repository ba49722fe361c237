"""Which probe set a sweep of a workdir uses, and the checks of a probe configuration.

The probe sequences are fixed per lineage: a run started from another run's checkpoint is probed
on its root's sequences (:func:`probe_source`). ``probe_set`` overrides given at probe time
(``num_sequences``, ``batch_size``, ``seq_len``; for imported models also the text, ``text_dir``
or ``tfds_name``) are applied key by key over the run's own, recorded with the saved probe set
(``probes/probe_set.npz``), and kept by later sweeps. A results table holds one probe set:
overrides that give another one are refused (:class:`ProbeSetError`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from entropy_jax import data
from entropy_jax.checkpoint import Checkpoints, newest_readable_meta, saved_steps
from entropy_jax.config import DataConfig, ProbeSetConfig
from entropy_jax.data.builders import SYNTHETIC_KINDS
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import ModelConfig, hf
from entropy_jax.sharding import is_writer
from entropy_jax.sweep.evaluators import check_probes
from entropy_jax.sweep.table import ResultsTable
from entropy_jax.train.task_eval import held_out
from entropy_jax.workdir import Workdir, atomic_path, check_writable


class ProbeSetError(UserError):
    """The probe set on disk, the corpus and the results table disagree (or one is damaged)."""


def probe_plan(meta: dict, probe_config: ml_collections.ConfigDict | None) -> tuple[dict, dict, dict]:
    """(probes, the run's probe_set, probe_set overrides) of a sweep of the run that wrote ``meta``."""
    cfg = ml_collections.ConfigDict(meta["config"])
    probes, overrides = cfg.probes.to_dict(), {}
    if probe_config is not None:
        overrides = probe_set_overrides(probe_config.get("probe_set"))
        if probe_config.get("probes") is not None:
            probes = probe_config.probes.to_dict()
    return probes, cfg.probe_set.to_dict(), overrides


def probe_source(meta: dict) -> dict:
    """What fixes the probe sequences of the run that wrote ``meta``: its lineage root's data config."""
    if meta.get("probe_source"):
        return meta["probe_source"]
    cfg = meta["config"]
    return {"data": cfg["data"], "seq_len": cfg["train"]["seq_len"], "probe_set": cfg["probe_set"]}


# probe_set keys a probe-time override may set (experiments/configs/probe.py); the text keys apply
# to imported models only (a native run is probed on its own corpus's validation split).
SIZE_KEYS = ("num_sequences", "batch_size", "seq_len")
TEXT_KEYS = ("text_dir", "tfds_name", "tfds_split", "data_dir")


def probe_set_overrides(section: Any) -> dict[str, Any]:
    """The set entries of a ``probe_set`` override section (None means "the run's own"); a text
    folder as an absolute path (it is recorded with the probe set and read again by later sweeps)."""
    section = section.to_dict() if hasattr(section, "to_dict") else dict(section or {})
    overrides = {k: v for k, v in section.items() if v is not None}
    if isinstance(overrides.get("text_dir"), str) and overrides["text_dir"]:
        overrides["text_dir"] = str(Path(overrides["text_dir"]).expanduser().absolute())
    return overrides


def check_probe_overrides(meta: dict, overrides: dict[str, Any]) -> None:
    """ProbeSetError (one line) for an override the run that wrote ``meta`` cannot take."""
    is_text = probe_source(meta).get("kind") == hf.probe_text.KIND
    for key, value in overrides.items():
        if key not in SIZE_KEYS + TEXT_KEYS:
            raise ProbeSetError(f"probe_set.{key} is not a probe-set key{did_you_mean(key, SIZE_KEYS + TEXT_KEYS)} "
                                f"(keys: {', '.join(SIZE_KEYS + TEXT_KEYS)})")
        if key in SIZE_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ProbeSetError(f"probe_set.{key}={value!r} must be an integer >= 1")
        if key in TEXT_KEYS and not is_text:
            raise ProbeSetError(f"probe_set.{key} chooses the text of an imported model's probe set; this run is "
                                f"probed on its own corpus (data.name={probe_source(meta)['data'].get('name')!r}): "
                                "drop it, or set probe_set.num_sequences / seq_len only")
        if key in TEXT_KEYS and not isinstance(value, str):
            raise ProbeSetError(f"probe_set.{key}={value!r} must be a string")
    if overrides.get("text_dir") and overrides.get("tfds_name"):
        raise ProbeSetError("give probe_set.text_dir (a folder of text files) or probe_set.tfds_name (a prepared "
                            "TFDS text dataset), not both")
    max_len = meta["model_config"].get("max_len", ModelConfig.max_len)
    if overrides.get("seq_len", 0) > max_len:
        raise ProbeSetError(f"probe_set.seq_len={overrides['seq_len']} is longer than the model's max_len={max_len}: "
                            f"give at most {max_len}")


def _combined(saved: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` over ``saved``; a new text source (folder or TFDS set) replaces the saved one."""
    if new.get("text_dir") or new.get("tfds_name"):
        saved = {k: v for k, v in saved.items() if k not in ("text_dir", "tfds_name")}
    return {**saved, **new}


def resolved_source(meta: dict, probe_set: dict, overrides: dict[str, Any]) -> dict:
    """The run's probe source with its config's ``probe_set`` merged in, then ``overrides`` key by key
    (``seq_len`` is the source's; a text folder is made absolute and replaces a TFDS set, and back)."""
    source = probe_source(meta)
    sizes = {k: v for k, v in overrides.items() if k != "seq_len"}
    if sizes.get("text_dir"):
        sizes |= {"text_dir": str(Path(sizes["text_dir"]).expanduser().absolute()), "tfds_name": ""}
    elif sizes.get("tfds_name"):
        sizes["text_dir"] = ""
    return {**source, "seq_len": int(overrides.get("seq_len", source["seq_len"])),
            "probe_set": {**source["probe_set"], **probe_set, **sizes}}


def _saved_probe_set(path: Path) -> tuple[str, dict[str, Any]]:
    """The sha256 recorded in ``probe_set.npz`` (checked against its tokens) and the probe-time
    overrides it was built with ({} for none or an older file); ProbeSetError if damaged."""
    try:
        with np.load(path, allow_pickle=False) as saved:
            tokens, digest = np.asarray(saved["tokens"]), str(saved["sha256"])
            overrides = json.loads(str(saved["overrides"])) if "overrides" in saved.files else {}
    except Exception as e:  # truncated (BadZipFile), garbled (not a zip), missing arrays...
        raise ProbeSetError(f"the probe set {path} is damaged ({type(e).__name__}: {e}); delete it: the next "
                            "sweep rebuilds it from the corpus and checks it against the results table") from e
    if hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest() != digest:
        raise ProbeSetError(f"the probe set {path} is damaged (its tokens do not match its sha256); delete it: "
                            "the next sweep rebuilds it from the corpus and checks it against the results table")
    return digest, overrides


def saved_overrides(workdir: Workdir) -> dict[str, Any]:
    """The probe-time overrides the workdir's saved probe set was built with ({} if none)."""
    return _saved_probe_set(workdir.probe_set)[1] if workdir.probe_set.exists() else {}


def probe_tokens(source: dict) -> tuple[np.ndarray, str]:
    """The probe tokens a resolved source gives and their sha256 (ProbeSetError: too little data)."""
    if source.get("kind") == hf.probe_text.KIND:  # an imported model: its own tokenizer over text
        name, data_dir = source["probe_set"].get("tfds_name"), source["probe_set"].get("data_dir")
        try:
            return hf.probe_tokens(source)
        except UserError:
            raise
        except Exception as e:  # TFDS: an unknown name, a set not prepared as array_record
            if not name:
                raise
            why = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            where = data_dir or "the TFDS default folder"
            raise ProbeSetError(f"probe_set.tfds_name={name!r} cannot be read from {where} ({type(e).__name__}: "
                                f"{why}): prepare it with `tfds build {name} --file_format=array_record`, or give "
                                "probe_set.text_dir") from e
    try:
        corpus = data.load_corpus(ml_collections.ConfigDict(source["data"]), source["seq_len"])
        return data.probe_set(corpus, source["probe_set"]["num_sequences"])
    except ValueError as e:  # a probe set larger than the split, a seq_len beyond the stored sequences
        raise ProbeSetError(f"the probe set cannot be built: {e}; lower probe_set.num_sequences or seq_len") from e


def planned_probe_set(workdir: Workdir, source: dict, table: ResultsTable | None = None,
                      requested: dict[str, Any] | None = None) -> tuple[np.ndarray, str]:
    """The probe tokens of ``source`` and their sha256, after checking them against the saved probe
    set and the one the results ``table`` records (two probe sets never share a table); writes
    nothing. ``requested``: the probe-time overrides that changed the source (named if refused)."""
    tokens, digest = probe_tokens(source)
    path, results = workdir.probe_set, workdir.results
    saved = _saved_probe_set(path)[0] if path.exists() else None
    recorded = table.probe_set_sha256 if table is not None else None
    other = next((d for d in (saved, recorded) if d is not None and d != digest), None)
    if requested and other is not None:
        raise ProbeSetError(
            f"probe_set overrides {requested} give probe set sha256 {digest[:12]}..., but {workdir.root} was probed "
            f"on {other[:12]}... and a results table holds one probe set: drop the overrides, or delete {path} and "
            f"{results} to recompute every row on the new set, or probe a new workdir whose checkpoints/ is a link "
            f"to {workdir.checkpoints}")
    if saved is not None and saved != digest:
        raise ProbeSetError(f"the probe set in {path} (sha256 {saved[:12]}...) differs from the one the run's "
                            f"config gives now ({digest[:12]}...): the probe set changed (probe_set.num_sequences, "
                            "or the corpus it is drawn from); to probe on another set, use a new workdir whose "
                            f"checkpoints/ is a link to {workdir.checkpoints}, or delete {path} and {results} and "
                            "probe with --config.probe_set... on the empty table")
    if recorded is not None and recorded != digest:
        raise ProbeSetError(f"the rows in {results} were computed on probe set sha256 {recorded[:12]}..., but the "
                            f"run's config now gives {digest[:12]}... (the probe set changed: probe_set.num_sequences, "
                            f"or the corpus it is drawn from): use a new workdir, or delete {results} to recompute "
                            "every row on the new probe set")
    if recorded is None and table is not None and not table.frame.empty and not path.exists():
        raise ProbeSetError(f"{results} holds rows, but the probe set they were computed on ({path}) is gone and "
                            f"the table does not record it: restore {path}, or delete {results} to recompute")
    return tokens, digest


def fixed_probe_set(workdir: Workdir, source: dict, table: ResultsTable | None = None,
                    requested: dict[str, Any] | None = None,
                    record: dict[str, Any] | None = None) -> tuple[np.ndarray, str]:
    """The run's fixed probe tokens and their sha256 (:func:`planned_probe_set`), saved once with
    the probe-time overrides that chose them (``record``), so later sweeps keep that choice."""
    tokens, digest = planned_probe_set(workdir, source, table, requested)
    if not workdir.probe_set.exists() and is_writer():
        with atomic_path(workdir.probe_set) as tmp, tmp.open("wb") as f:
            np.savez(f, tokens=tokens, sha256=digest, overrides=json.dumps(record or {}))
    return tokens, digest


def sweep_probe_set(workdir: Workdir, meta: dict, probe_set: dict, overrides: dict[str, Any] | None = None,
                    table: ResultsTable | None = None) -> tuple[np.ndarray, str, int]:
    """Tokens, sha256 and forward batch size of the probe set a sweep of ``workdir`` uses: the
    run's own (``meta`` and its config's ``probe_set``), with the overrides saved with its probe
    set and then ``overrides`` applied key by key; checked (:func:`check_probe_overrides`,
    :func:`planned_probe_set`), and saved when a writer's ``table`` is given."""
    overrides = overrides or {}
    check_probe_overrides(meta, overrides)
    saved = saved_overrides(workdir)
    in_force = _combined(saved, overrides)
    source = resolved_source(meta, probe_set, in_force)
    requested = overrides if source != resolved_source(meta, probe_set, saved) else {}
    if table is None:
        tokens, digest = planned_probe_set(workdir, source, ResultsTable(workdir), requested)
    else:
        tokens, digest = fixed_probe_set(workdir, source, table, requested, in_force)
    return tokens, digest, int(source["probe_set"]["batch_size"])



def task_prompts(meta: dict) -> np.ndarray:
    """The held-out task prompts of the fine-tuning stage that wrote ``meta``: the first prompts of its
    task corpus's ``validation`` split, the ones its held-out evaluation answers (int32 N x P; never
    trained on). They are fixed by the stage's data config, so the stages of a lineage on one task
    share them. ProbeSetError for a run without a task corpus."""
    cfg = meta["config"]
    if cfg["data"].get("name") != "tasks":
        raise ProbeSetError(f"a probe reads task prompts, but the run trains on data.name={cfg['data'].get('name')!r}, "
                            "which has none: drop the probe entry with inputs='task_prompts'")
    corpus = data.load_corpus(ml_collections.ConfigDict(cfg["data"]), cfg["train"]["seq_len"])
    return held_out(corpus.validation)["prompt"]


def check_probe_config(cfg: ml_collections.ConfigDict) -> ProbeSetConfig:
    """The ``probe_set`` and ``probes`` sections of a run config (each probe entry constructed by
    its evaluator, which checks its own kwargs)."""
    probe_set = ProbeSetConfig.from_dict(cfg.probe_set)
    check_probes(cfg.probes, cfg.data.get("name"))
    return probe_set


def check_probe_workdir(value: str | None, probe_config: ml_collections.ConfigDict | None) -> Path:
    """``probe.py``'s input: a run folder the probe sweep can read and write its probes/ in. It
    holds checkpoints, and (if given) a probe config whose ``probes`` are valid and whose
    ``probe_set`` overrides (None: the run's own) fit the run. An override, or an imported model's
    text probe set, is built and checked against the probe set the workdir already holds
    (:func:`sweep_probe_set`), writing nothing. UserError otherwise."""
    workdir = Workdir.from_flag(value)
    if not workdir.root.is_dir():
        raise UserError(f"--workdir={value} does not exist: give a run folder written by experiments/pretrain.py")
    steps = saved_steps(workdir.root)
    if not steps:
        raise UserError(f"no checkpoints in {workdir.checkpoints}: train first "
                        f"(experiments/pretrain.py --workdir={workdir.root})")
    with Checkpoints(workdir.root, read_only=True) as ckpts:
        meta = newest_readable_meta(ckpts, steps)
    if probe_config is not None and probe_config.get("probes") is not None:
        check_probes(probe_config.probes, meta["config"]["data"].get("name"))
    _, probe_set, overrides = probe_plan(meta, probe_config)
    check_probe_overrides(meta, overrides)
    source = probe_source(meta)
    num_sequences = overrides.get("num_sequences", probe_set.get("num_sequences"))
    num_val = source.get("data", {}).get("num_val", DataConfig.num_val)
    if source.get("data", {}).get("name") in SYNTHETIC_KINDS and num_sequences > num_val:
        raise UserError(f"probe_set.num_sequences={num_sequences} is larger than the run's validation "
                        f"split ({num_val} sequences)")
    if overrides or source.get("kind") == hf.probe_text.KIND:
        sweep_probe_set(workdir, meta, probe_set, overrides)
    check_writable(workdir.probes, "the probe sweep")
    return workdir.root
