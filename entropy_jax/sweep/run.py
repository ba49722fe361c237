"""Probe every checkpoint of a run and append tidy rows to ``workdir/probes/results.parquet``.

The probe entries come from the run's config (``config.probes.<name> = dict(type=..., **kwargs)``,
see :mod:`entropy_jax.sweep.evaluators` for the types and their rows). The probe sequences are
fixed per lineage: a run started from another run's checkpoint is probed on its root's sequences.

Resumable: a checkpoint is computed only if some of its expected rows are missing, and only
missing rows are appended. Rows whose ``ckpt_hash`` no longer matches the checkpoint (the workdir
was retrained) are recomputed, with a warning. A checkpoint that cannot be read is reported and
skipped. The same :class:`Prober` runs inside training (:func:`training_hook`), so rows written
there are found present here. The sweep holds the workdir's lock (one writer at a time); the
training process holds it for its hook.

The probe set can be chosen at probe time: ``probe_set`` overrides (``num_sequences``,
``batch_size``, ``seq_len``; for imported models also the text, ``text_dir`` or ``tfds_name``)
are applied key by key over the run's own, recorded with the saved probe set, and kept by later
sweeps. A table holds one probe set: overrides that give another one are refused
(:class:`ProbeSetError`). ``shard_params=True`` restores every parameter split over the mesh's
``data`` axis (FSDP-style, :func:`entropy_jax.models.hf.load.fsdp_spec`), so a model larger
than one device's memory is probed; XLA gathers what each forward needs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from entropy_jax import data
from entropy_jax.checkpoint import CheckpointReadError, Checkpoints, content_hash
from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.models import ModelConfig, abstract_model, hf
from entropy_jax.sharding import fsdp_sharding, is_writer, make_mesh
from entropy_jax.sweep.evaluators import Context, Evaluator, make_evaluators, model_info
from entropy_jax.sweep.forward import probe_forward
from entropy_jax.sweep.table import ResultsTable
from entropy_jax.workdir import Workdir, atomic_path


@dataclasses.dataclass
class SweepReport:
    rows_added: int = 0
    probed_steps: list[int] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, reason)
    recomputed: list[int] = dataclasses.field(default_factory=list)  # steps whose rows were stale
    results_path: Path | None = None


class ProbeSetError(UserError):
    """The probe set on disk, the corpus and the results table disagree (or one is damaged)."""


def params_hash(params: Any) -> str:
    """The results table's ``ckpt_hash``: the first 16 hex digits of :func:`content_hash` of the
    parameters (the checksum a checkpoint saves with them)."""
    return content_hash(params)[:16]


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


def _write_npz(path: Path, arrays: dict[str, Any]) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **arrays)


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
                            f"data config gives now ({digest[:12]}...); the corpus changed: use a new workdir")
    if recorded is not None and recorded != digest:
        raise ProbeSetError(f"the rows in {results} were computed on probe set sha256 {recorded[:12]}..., but the "
                            f"run's corpus now gives {digest[:12]}... (the corpus changed): use a new workdir, or "
                            f"delete {results} to recompute every row on the new probe set")
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
        _write_npz(workdir.probe_set, {"tokens": tokens, "sha256": digest, "overrides": json.dumps(record or {})})
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
        tokens, digest = planned_probe_set(workdir, source, ResultsTable(workdir.root), requested)
    else:
        tokens, digest = fixed_probe_set(workdir, source, table, requested, in_force)
    return tokens, digest, int(source["probe_set"]["batch_size"])


def _save_spectra(path: Path, spectra: dict[str, np.ndarray], replace: bool = False) -> None:
    """Merge ``spectra`` into ``path`` (``replace``: drop what it held, e.g. another model's)."""
    if not spectra or not is_writer():
        return
    if path.exists() and not replace:
        try:
            with np.load(path, allow_pickle=False) as old:
                spectra = {**{k: old[k] for k in old.files}, **spectra}
        except Exception as e:  # a damaged file holds nothing worth keeping: the rows are in the table
            logging.warning("replacing the damaged spectra file %s (%s: %s)", path, type(e).__name__, e)
    _write_npz(path, spectra)


def duplicate_rows(meta: dict, base: dict) -> list[dict]:
    """A ``checkpoint / duplicate_of_step`` row, and a warning, for a checkpoint whose metadata says
    it holds exactly the parameters of an earlier step (``duplicate_of``, written by
    experiments/import_hf.py, which hashes every imported revision: published Pythia and OLMo
    branches have served duplicated weights). Value: that step."""
    twin = meta.get("duplicate_of")
    if twin is None:
        return []
    logging.warning("step %d holds exactly the parameters of step %d (ckpt_hash %s): duplicated weights",
                    base["step"], twin, base["ckpt_hash"])
    return [{**base, "probe": "checkpoint", "layer": -1, "head": -1, "metric": "duplicate_of_step",
             "value": float(twin), "note": f"identical parameters (ckpt_hash {base['ckpt_hash']}) to step {twin}"}]


class Prober:
    """What every checkpoint of one run shares: model skeleton, probe set, evaluators, results table."""

    def __init__(self, workdir: str | Path, meta: dict, probes: Any, probe_set: Any,
                 mesh: jax.sharding.Mesh, in_training: bool = False, overrides: dict[str, Any] | None = None,
                 shard_params: bool = False):
        self.workdir, self.mesh = Workdir(workdir), mesh
        mcfg = ModelConfig.from_dict(meta["model_config"])
        self.graphdef, self.params_target, self.model_state_target = abstract_model(mcfg, mesh)
        if shard_params:  # FSDP-style: each parameter split over `data` along its largest divisible axis
            self.params_target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                              self.params_target, fsdp_sharding(self.params_target, mesh))
        info = model_info(self.params_target, mcfg.num_layers, mcfg.num_heads)
        evaluators = make_evaluators(probes, info)
        self.evaluators: dict[str, Evaluator] = {
            n: e for n, e in evaluators.items() if e.in_training or not in_training}
        self.expected = {n: e.expected_keys() for n, e in self.evaluators.items()}
        self.attention_examples = max((e.num_examples for e in self.evaluators.values() if e.needs_attention),
                                      default=0)
        self.table, self.report = ResultsTable(self.workdir.root), SweepReport(results_path=None)
        self.report.results_path = self.table.path
        self.tokens, self.probe_set_sha256, self.batch_size = sweep_probe_set(
            self.workdir, meta, probe_set, overrides, self.table)
        self.run_id = meta.get("run_id") or self.workdir.run_id()
        self._stale_steps: set[int] = set()  # their spectra files are replaced, not merged

    def missing(self, stage: str, step: int, ckpt_hash: str | None = None) -> dict[str, set]:
        """Rows of checkpoint ``step`` the table lacks, per probe entry. Process 0 decides and every
        process follows (they run collectives together, so they must agree on what to compute).
        Given the checkpoint's ``ckpt_hash``, rows computed from other parameters count as missing."""
        stale = self.table.drop_stale(self.run_id, stage, step, ckpt_hash) if ckpt_hash else set()
        if stale:
            logging.warning("step %d: the table's rows were computed from other parameters (ckpt_hash %s, the "
                            "checkpoint's is %s; the workdir was retrained): recomputing them",
                            step, ", ".join(sorted(stale)), ckpt_hash)
            self.report.recomputed.append(step)
            self._stale_steps.add(step)
        present = self.table.present(self.run_id, stage, step)
        todo = {n: keys - present for n, keys in self.expected.items() if keys - present}
        if jax.process_count() > 1:
            names = sorted(self.expected)
            mask = multihost_utils.broadcast_one_to_all(np.array([n in todo for n in names]))
            todo = {n: todo.get(n, self.expected[n]) for n, m in zip(names, mask, strict=True) if m}
        return todo

    def forget_other_steps(self, steps: list[int]) -> None:
        """After a retrain (stale rows found), rows at steps without a checkpoint come from the
        earlier training too: delete them and their spectra."""
        if not self.report.recomputed or not is_writer():
            return
        gone = self.table.drop_steps_except(self.run_id, set(steps))
        for step in gone:
            self.workdir.spectra_file(step).unlink(missing_ok=True)
        if gone:
            logging.warning("deleted the rows of steps %s: the workdir was retrained and holds no checkpoint "
                            "of them", gone)

    def probe(self, step: int, meta: dict, params: nnx.State, model_state: nnx.State,
              todo: dict[str, set], ckpt_hash: str | None = None) -> int:
        """Compute the ``todo`` rows of one checkpoint and append them; returns the rows added."""
        attention = self.attention_examples if any(self.evaluators[n].needs_attention for n in todo) else 0
        norm = next((e.norm for e in self.evaluators.values() if e.needs_attention), "certified")
        out = probe_forward(self.graphdef, params, model_state, self.tokens, self.mesh, self.batch_size, attention,
                            norm, representations=any(self.evaluators[n].needs_representations for n in todo))
        ctx = Context(forward=out, params=params, mesh=self.mesh, spectra={})
        base = {"run": self.run_id, "stage": meta["stage"], "step": step, "tokens_seen": meta["tokens_seen"],
                "ckpt_hash": ckpt_hash or params_hash(params)}
        rows = []
        for name, missing in todo.items():
            for key, value, note in self.evaluators[name].run(ctx):
                if key in missing:
                    rows.append({**base, "probe": key[0], "layer": key[1], "head": key[2], "metric": key[3],
                                 "value": value, "note": note})
        rows += duplicate_rows(meta, base)
        _save_spectra(self.workdir.spectra_file(step), ctx.spectra, replace=step in self._stale_steps)
        added = self.table.append(rows, self.probe_set_sha256) if is_writer() else 0
        self.report.rows_added += added
        self.report.probed_steps.append(step)
        logging.info("probed step %d (%d tokens): %d rows -> %s", step, meta["tokens_seen"], added, self.table.path)
        return added


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def non_finite_params(params: Any) -> list[str]:
    """Paths of the parameter arrays holding NaN or Inf (empty when all are finite); checked on
    the devices in one compiled call (sharded parameters are never gathered)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0], strict=True)
    finite = np.asarray(jax.device_get(_all_finite(list(leaves))))
    return [jax.tree_util.keystr(path) for path, ok in zip(paths, finite, strict=True) if not ok]


def newest_readable_meta(ckpts: Checkpoints, steps: list[int]) -> dict:
    """The metadata of the newest checkpoint whose metadata reads (a damaged newest step is
    reported by the sweep itself and must not stop it)."""
    for step in reversed(steps):
        try:
            return ckpts.read_meta(step)
        except CheckpointReadError as e:
            logging.warning("metadata of step %d unreadable, using an earlier step's: %s", step, e)
    raise CheckpointReadError(f"no checkpoint in {ckpts.directory} has readable metadata (steps {steps}); "
                              "the checkpoints are damaged: retrain, or restore them from a copy")


def sweep(workdir: str | Path, probe_config: ml_collections.ConfigDict | None = None,
          mesh: jax.sharding.Mesh | None = None, shard_params: bool = False) -> SweepReport:
    """Probe all checkpoints in ``workdir`` with the run's own probes and probe set (its config saved
    in the latest checkpoint). ``probe_config``: its ``probe_set`` entries (None: the run's own)
    override the run's key by key (see :func:`sweep_probe_set`), its ``probes`` section, if any,
    replaces the run's. ``shard_params``: restore the parameters FSDP-sharded over ``data``.

    Raises WorkdirBusyError when another process holds the workdir (training, another sweep)."""
    wd = Workdir(workdir)
    if not wd.checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoints in {wd.checkpoints}: train first (experiments/pretrain.py)")
    with wd.lock("the probe sweep", enabled=is_writer(), create=False):
        return _sweep(wd, probe_config, mesh, shard_params)


def probe_plan(meta: dict, probe_config: ml_collections.ConfigDict | None) -> tuple[dict, dict, dict]:
    """(probes, the run's probe_set, probe_set overrides) of a sweep of the run that wrote ``meta``."""
    cfg = ml_collections.ConfigDict(meta["config"])
    probes, overrides = cfg.probes.to_dict(), {}
    if probe_config is not None:
        overrides = probe_set_overrides(probe_config.get("probe_set"))
        if probe_config.get("probes") is not None:
            probes = probe_config.probes.to_dict()
    return probes, cfg.probe_set.to_dict(), overrides


def _sweep(wd: Workdir, probe_config: ml_collections.ConfigDict | None, mesh: jax.sharding.Mesh | None,
           shard_params: bool = False) -> SweepReport:
    with Checkpoints(wd.root, read_only=True) as ckpts:
        steps = ckpts.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpts.directory}: train first (experiments/pretrain.py)")
        meta = newest_readable_meta(ckpts, steps)
        probes, probe_set, overrides = probe_plan(meta, probe_config)
        prober = Prober(wd.root, meta, probes, probe_set, mesh or make_mesh(), overrides=overrides,
                        shard_params=shard_params)
        for step in tqdm(steps, desc="checkpoints", unit="ckpt", disable=not sys.stderr.isatty()):
            try:
                step_meta = ckpts.read_meta(step)
                saved_hash = ckpts.read_checksums(step).get("params")  # None: saved before checksums
                todo = prober.missing(step_meta["stage"], step, saved_hash and saved_hash[:16])
                if todo:
                    r = ckpts.restore(step, arrays={"params": prober.params_target,
                                                    "model_state": prober.model_state_target})
                    bad = non_finite_params(r["params"])
                    if bad:
                        reason = (f"parameters are not finite ({len(bad)} arrays with NaN/Inf, e.g. {bad[0]}): "
                                  "the run diverged at or before this step; nothing probed")
                        logging.warning("skipping step %d: %s", step, reason)
                        prober.report.skipped.append((step, reason))
                        continue
                    prober.probe(step, step_meta, r["params"], r["model_state"], todo)
            except CheckpointReadError as e:
                logging.error("skipping step %d: %s", step, e)
                prober.report.skipped.append((step, str(e)))
        prober.forget_other_steps(steps)
    return prober.report


def training_hook(cfg: ml_collections.ConfigDict, workdir: str | Path):
    """The probes with ``in_training=True``, as a ``train.train(on_probe_step=...)`` hook.

    The rows go to the same table as the sweep's, keyed the same way, so a later
    ``experiments/probe.py`` finds them present and computes only the offline probes.
    """
    state: dict[str, Prober] = {}

    def hook(step: int, train_state: Any, meta: dict) -> None:
        if "prober" not in state:
            state["prober"] = Prober(workdir, meta, cfg.probes.to_dict(), cfg.probe_set.to_dict(), make_mesh(),
                                     in_training=True)
        prober = state["prober"]
        ckpt_hash = params_hash(train_state.params)
        todo = prober.missing(meta["stage"], step, ckpt_hash)
        if todo:
            prober.probe(step, meta, train_state.params, train_state.model_state, todo, ckpt_hash)

    return hook
