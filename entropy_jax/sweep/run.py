"""Probe every checkpoint of a run and append tidy rows to ``workdir/probes/results.parquet``.

The probe entries come from the run's config (``config.probes.<name> = dict(type=..., **kwargs)``,
see :mod:`entropy_jax.sweep.evaluators` for the types and their rows); which probe set, with
which probe-time overrides, is :mod:`entropy_jax.sweep.probe_set`'s question.

Resumable: a checkpoint is computed only if some of its expected rows are missing, and only
missing rows are appended. Rows whose ``ckpt_hash`` no longer matches the checkpoint (the workdir
was retrained) are recomputed, with a warning. A checkpoint that cannot be read is reported and
skipped. The same :class:`Prober` runs inside training (:func:`training_hook`), so rows written
there are found present here. The sweep holds the workdir's lock (one writer at a time); the
training process holds it for its hook.

``shard_params=True`` restores every parameter split over the mesh's
``data`` axis (FSDP-style, :func:`entropy_jax.models.hf.load.fsdp_spec`), so a model larger
than one device's memory is probed; XLA gathers what each forward needs.
"""

from __future__ import annotations

import dataclasses
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

from entropy_jax.checkpoint import CheckpointReadError, Checkpoints, content_hash, newest_readable_meta
from entropy_jax.models import ModelConfig, abstract_model
from entropy_jax.sharding import fsdp_sharding, is_writer, make_mesh
from entropy_jax.sweep.evaluators import Context, Evaluator, make_evaluators, model_info
from entropy_jax.sweep.forward import probe_forward, union
from entropy_jax.sweep.probe_set import probe_plan, sweep_probe_set, task_prompts
from entropy_jax.sweep.table import ResultsTable
from entropy_jax.workdir import Workdir, atomic_path


@dataclasses.dataclass
class SweepReport:
    rows_added: int = 0
    probed_steps: list[int] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, reason)
    recomputed: list[int] = dataclasses.field(default_factory=list)  # steps whose rows were stale
    results_path: Path | None = None


def params_hash(params: Any) -> str:
    """The results table's ``ckpt_hash``: the first 16 hex digits of :func:`content_hash` of the
    parameters (the checksum a checkpoint saves with them)."""
    return content_hash(params)[:16]


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
    with atomic_path(path) as tmp, tmp.open("wb") as f:
        np.savez(f, **spectra)


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

    def __init__(self, workdir: Workdir, meta: dict, probes: Any, probe_set: Any,
                 mesh: jax.sharding.Mesh, in_training: bool = False, overrides: dict[str, Any] | None = None,
                 shard_params: bool = False):
        self.workdir, self.mesh = workdir, mesh
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
        self.table = ResultsTable(workdir)
        self.report = SweepReport(results_path=self.table.path)
        self.tokens, self.probe_set_sha256, self.batch_size = sweep_probe_set(
            self.workdir, meta, probe_set, overrides, self.table)
        reads_prompts = any(e.reads().task_prompts for e in self.evaluators.values())
        self.task_tokens = task_prompts(meta) if reads_prompts else None
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
        reads = union(self.evaluators[n].reads() for n in todo)  # a pass no evaluator here reads is skipped
        out = probe_forward(self.graphdef, params, model_state, self.tokens, self.mesh, self.batch_size, reads,
                            self.task_tokens)
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

    def record_non_finite(self, step: int, meta: dict, params: nnx.State, arrays: int, reason: str) -> None:
        """A ``checkpoint / non_finite_arrays`` row (value: how many parameter arrays hold NaN/Inf,
        note: why nothing else was probed), so tables and plots show where a run diverged."""
        row = {"run": self.run_id, "stage": meta["stage"], "step": step, "tokens_seen": meta["tokens_seen"],
               "ckpt_hash": params_hash(params), "probe": "checkpoint", "layer": -1, "head": -1,
               "metric": "non_finite_arrays", "value": float(arrays), "note": reason}
        if is_writer():
            self.report.rows_added += self.table.append([row], self.probe_set_sha256)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.isfinite(x).all() for x in leaves])


def non_finite_params(params: Any) -> list[str]:
    """Paths of the parameter arrays holding NaN or Inf (empty when all are finite); checked on
    the devices in one compiled call (sharded parameters are never gathered)."""
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0], strict=True)
    finite = np.asarray(jax.device_get(_all_finite(list(leaves))))
    return [jax.tree_util.keystr(path) for path, ok in zip(paths, finite, strict=True) if not ok]


def sweep(workdir: str | Path | Workdir, probe_config: ml_collections.ConfigDict | None = None,
          mesh: jax.sharding.Mesh | None = None, shard_params: bool = False) -> SweepReport:
    """Probe all checkpoints in ``workdir`` with the run's own probes and probe set (its config saved
    in the latest checkpoint). ``probe_config``: its ``probe_set`` entries (None: the run's own)
    override the run's key by key (see :func:`sweep_probe_set`), its ``probes`` section, if any,
    replaces the run's. ``shard_params``: restore the parameters FSDP-sharded over ``data``.

    Raises WorkdirBusyError when another process holds the workdir (training, another sweep)."""
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    if not wd.checkpoints.is_dir():
        raise FileNotFoundError(f"no checkpoints in {wd.checkpoints}: train first (experiments/pretrain.py)")
    with wd.lock("the probe sweep", enabled=is_writer(), create=False):
        return _sweep(wd, probe_config, mesh, shard_params)


def _sweep(wd: Workdir, probe_config: ml_collections.ConfigDict | None, mesh: jax.sharding.Mesh | None,
           shard_params: bool = False) -> SweepReport:
    with Checkpoints(wd.root, read_only=True) as ckpts:
        steps = ckpts.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpts.directory}: train first (experiments/pretrain.py)")
        meta = newest_readable_meta(ckpts, steps)
        probes, probe_set, overrides = probe_plan(meta, probe_config)
        prober = Prober(wd, meta, probes, probe_set, mesh or make_mesh(), overrides=overrides,
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
                        prober.record_non_finite(step, step_meta, r["params"], len(bad), reason)
                        continue
                    prober.probe(step, step_meta, r["params"], r["model_state"], todo)
            except CheckpointReadError as e:
                logging.error("skipping step %d: %s", step, e)
                prober.report.skipped.append((step, str(e)))
        prober.forget_other_steps(steps)
    return prober.report


def training_hook(cfg: ml_collections.ConfigDict, workdir: str | Path | Workdir):
    """The probes with ``in_training=True``, as a ``train.train(on_probe_step=...)`` hook.

    The rows go to the same table as the sweep's, keyed the same way, so a later
    ``experiments/probe.py`` finds them present and computes only the offline probes.
    """
    wd = workdir if isinstance(workdir, Workdir) else Workdir(workdir)
    state: dict[str, Prober] = {}

    def hook(step: int, train_state: Any, meta: dict) -> None:
        if "prober" not in state:
            state["prober"] = Prober(wd, meta, cfg.probes.to_dict(), cfg.probe_set.to_dict(), make_mesh(),
                                     in_training=True)
        prober = state["prober"]
        ckpt_hash = params_hash(train_state.params)
        todo = prober.missing(meta["stage"], step, ckpt_hash)
        if todo:
            prober.probe(step, meta, train_state.params, train_state.model_state, todo, ckpt_hash)

    return hook
