"""Probe every checkpoint of a run and append tidy rows to ``workdir/probes/results.parquet``.

The probe entries come from the run's config (``config.probes.<name> = dict(type=..., **kwargs)``,
see :mod:`entropy_jax.sweep.evaluators` for the types and their rows). The probe sequences are
fixed per lineage: a run started from another run's checkpoint is probed on its root's sequences.

Resumable: a checkpoint is computed only if some of its expected rows are missing, and only
missing rows are appended. A checkpoint that cannot be read is reported and skipped. The same
:class:`Prober` runs inside training (:func:`training_hook`), so rows written there are found
present here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from entropy_jax import data
from entropy_jax.checkpoint import CheckpointReadError, Checkpoints
from entropy_jax.models import ModelConfig, abstract_model, hf
from entropy_jax.sharding import is_writer, make_mesh
from entropy_jax.sweep.evaluators import Context, Evaluator, make_evaluators, model_info
from entropy_jax.sweep.forward import probe_forward
from entropy_jax.sweep.table import ResultsTable
from entropy_jax.workdir import Workdir


@dataclasses.dataclass
class SweepReport:
    rows_added: int = 0
    probed_steps: list[int] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, reason)
    results_path: Path | None = None


def params_hash(params: Any) -> str:
    """sha256 (first 16 hex digits) of the parameter bytes: identifies a checkpoint's content."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def probe_source(meta: dict) -> dict:
    """What fixes the probe sequences of the run that wrote ``meta``: its lineage root's data config."""
    if meta.get("probe_source"):
        return meta["probe_source"]
    cfg = meta["config"]
    return {"data": cfg["data"], "seq_len": cfg["train"]["seq_len"], "probe_set": cfg["probe_set"]}


def fixed_probe_set(workdir: Workdir, source: dict) -> np.ndarray:
    """The run's fixed probe tokens, saved once with their hash; later sweeps must match it."""
    if source.get("kind") == hf.probe_text.KIND:  # an imported model: its own tokenizer over text
        tokens, digest = hf.probe_tokens(source)
    else:
        corpus = data.load_corpus(ml_collections.ConfigDict(source["data"]), source["seq_len"])
        tokens, digest = data.probe_set(corpus, source["probe_set"]["num_sequences"])
    path = workdir.probe_set
    if path.exists():
        saved = np.load(path)
        if str(saved["sha256"]) != digest:
            raise ValueError(f"the probe set in {path} (sha256 {saved['sha256']}) differs from the one the "
                             f"run's data config gives now ({digest}); the corpus changed: use a new workdir")
    elif is_writer():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.npz")
        np.savez(tmp, tokens=tokens, sha256=digest)
        tmp.replace(path)
    return tokens


def _save_spectra(path: Path, spectra: dict[str, np.ndarray]) -> None:
    if not spectra or not is_writer():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        spectra = {**dict(np.load(path)), **spectra}
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez(tmp, **spectra)
    tmp.replace(path)


def duplicate_rows(frame: Any, base: dict) -> list[dict]:
    """A ``checkpoint / duplicate_of_step`` row, and a warning, when another step of the run already
    in the table holds exactly these parameters (same ``ckpt_hash``): published revisions (Pythia,
    OLMo branches) have served duplicated weights. Value: the earliest such step."""
    same = frame[(frame["run"] == base["run"]) & (frame["ckpt_hash"] == base["ckpt_hash"])
                 & (frame["step"] != base["step"])]
    if same.empty:
        return []
    twin = int(same["step"].min())
    logging.warning("step %d holds exactly the parameters of step %d (ckpt_hash %s): duplicated weights",
                    base["step"], twin, base["ckpt_hash"])
    return [{**base, "probe": "checkpoint", "layer": -1, "head": -1, "metric": "duplicate_of_step",
             "value": float(twin), "note": f"identical parameters (ckpt_hash {base['ckpt_hash']}) to step {twin}"}]


class Prober:
    """What every checkpoint of one run shares: model skeleton, probe set, evaluators, results table."""

    def __init__(self, workdir: str | Path, meta: dict, probes: Any, probe_set: Any,
                 mesh: jax.sharding.Mesh, in_training: bool = False):
        self.workdir, self.mesh = Workdir(workdir), mesh
        mcfg = ModelConfig.from_dict(meta["model_config"])
        self.graphdef, self.params_target, self.model_state_target = abstract_model(mcfg, mesh)
        info = model_info(self.params_target, mcfg.num_layers, mcfg.num_heads)
        evaluators = make_evaluators(probes, info)
        self.evaluators: dict[str, Evaluator] = {
            n: e for n, e in evaluators.items() if e.in_training or not in_training}
        self.expected = {n: e.expected_keys() for n, e in self.evaluators.items()}
        self.attention_examples = max((e.num_examples for e in self.evaluators.values() if e.needs_attention),
                                      default=0)
        source = probe_source(meta)
        self.tokens = fixed_probe_set(self.workdir, {**source, "probe_set": {**source["probe_set"], **probe_set}})
        self.batch_size = int(probe_set["batch_size"])
        self.run_id = meta.get("run_id") or self.workdir.run_id()
        self.table, self.report = ResultsTable(self.workdir.root), SweepReport(results_path=None)
        self.report.results_path = self.table.path

    def missing(self, stage: str, step: int) -> dict[str, set]:
        """Rows of checkpoint ``step`` the table lacks, per probe entry. Process 0 decides and every
        process follows (they run collectives together, so they must agree on what to compute)."""
        present = self.table.present(self.run_id, stage, step)
        todo = {n: keys - present for n, keys in self.expected.items() if keys - present}
        if jax.process_count() > 1:
            names = sorted(self.expected)
            mask = multihost_utils.broadcast_one_to_all(np.array([n in todo for n in names]))
            todo = {n: todo.get(n, self.expected[n]) for n, m in zip(names, mask, strict=True) if m}
        return todo

    def probe(self, step: int, meta: dict, params: nnx.State, model_state: nnx.State,
              todo: dict[str, set]) -> int:
        """Compute the ``todo`` rows of one checkpoint and append them; returns the rows added."""
        attention = self.attention_examples if any(self.evaluators[n].needs_attention for n in todo) else 0
        out = probe_forward(self.graphdef, params, model_state, self.tokens, self.mesh, self.batch_size, attention)
        ctx = Context(forward=out, params=params, mesh=self.mesh, spectra={})
        base = {"run": self.run_id, "stage": meta["stage"], "step": step, "tokens_seen": meta["tokens_seen"],
                "ckpt_hash": params_hash(params)}
        rows = []
        for name, missing in todo.items():
            for key, value, note in self.evaluators[name].run(ctx):
                if key in missing:
                    rows.append({**base, "probe": key[0], "layer": key[1], "head": key[2], "metric": key[3],
                                 "value": value, "note": note})
        rows += duplicate_rows(self.table.frame, base)
        _save_spectra(self.workdir.spectra_file(step), ctx.spectra)
        added = self.table.append(rows) if is_writer() else 0
        self.report.rows_added += added
        self.report.probed_steps.append(step)
        logging.info("probed step %d (%d tokens): %d rows -> %s", step, meta["tokens_seen"], added, self.table.path)
        return added


def sweep(workdir: str | Path, probe_config: ml_collections.ConfigDict | None = None,
          mesh: jax.sharding.Mesh | None = None) -> SweepReport:
    """Probe all checkpoints in ``workdir``; ``probe_config`` (``probe_set`` + ``probes``) defaults
    to the run's own config saved in its latest checkpoint."""
    wd = Workdir(workdir)
    ckpts = Checkpoints(wd.root, read_only=True)
    try:
        steps = ckpts.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpts.directory}: train first (experiments/pretrain.py)")
        meta = ckpts.read_meta(steps[-1])
        cfg = ml_collections.ConfigDict(meta["config"])
        if probe_config is not None:
            cfg.probe_set, cfg.probes = probe_config.probe_set, probe_config.probes
        prober = Prober(wd.root, meta, cfg.probes.to_dict(), cfg.probe_set.to_dict(), mesh or make_mesh())
        for step in tqdm(steps, desc="checkpoints", unit="ckpt", disable=not sys.stderr.isatty()):
            try:
                step_meta = ckpts.read_meta(step)
                todo = prober.missing(step_meta["stage"], step)
                if todo:
                    r = ckpts.restore(step, arrays={"params": prober.params_target,
                                                    "model_state": prober.model_state_target})
                    prober.probe(step, step_meta, r["params"], r["model_state"], todo)
            except CheckpointReadError as e:
                logging.error("skipping step %d: %s", step, e)
                prober.report.skipped.append((step, str(e)))
    finally:
        ckpts.close()
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
        todo = prober.missing(meta["stage"], step)
        if todo:
            prober.probe(step, meta, train_state.params, train_state.model_state, todo)

    return hook
