"""Probe every checkpoint of a run and append tidy rows to ``workdir/probes/results.parquet``.

The probe entries come from the run's config (``config.probes.<name> = dict(type=..., **kwargs)``,
big_vision's evaluator style). Types:

* ``representation``: ``position`` "last" | "mean"; spectra of the residual stream of every
  layer (0 = embedding output, L = after the final norm): rankme, rankme_cov, alpha_req (+ R^2),
  von Neumann entropies, optional DSE (``dse_sigma`` > 0, bits); kwargs ``alpha_fit_range``.
  The normalised covariance spectra go to ``probes/spectra/step_XXXXXXXX.npz``.
* ``attention``: per block (layer 1..L) and head (head -1 = mean over heads): attention
  entropy, its normalisation by ln T_i, and the Theorem 3.1 bounds (nats), all over the first
  ``num_examples`` probe sequences (default 128: the bounds cost O(T^3) per head and sequence).
* ``weights``: spectral/Frobenius norm, stable rank, condition number of every weight matrix;
  metric ``<param path>/<statistic>``, layer = its block (1..L) or -1.
* ``output``: mean predictive (next-token) entropy over positions and at the last one (nats).

Resumable: a checkpoint is computed only if some of its expected rows are missing, and only
missing rows are appended. A checkpoint that cannot be read is reported and skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from entropy_jax import data
from entropy_jax.checkpoint import CheckpointReadError, Checkpoints
from entropy_jax.models import ModelConfig
from entropy_jax.probes.diffusion import diffusion_spectral_entropy
from entropy_jax.probes.forward import ATTENTION_METRICS, probe_forward
from entropy_jax.probes.spectra import spectral_metrics
from entropy_jax.probes.table import ResultsTable, RowKey
from entropy_jax.probes.weights import param_path, weight_spectra
from entropy_jax.sharding import make_mesh
from entropy_jax.train.loop import abstract_model

REPRESENTATION_METRICS = ("rankme", "rankme_cov", "alpha_req", "alpha_req_r2",
                          "von_neumann_entropy", "von_neumann_entropy_uncentred")
WEIGHT_STATS = ("spectral_norm", "frobenius_norm", "stable_rank", "condition_number")
OUTPUT_METRICS = ("predictive_entropy", "predictive_entropy_last")
PROBE_TYPES = ("representation", "attention", "weights", "output")
DEFAULT_ATTENTION_EXAMPLES = 128


@dataclasses.dataclass
class SweepReport:
    rows_added: int = 0
    probed_steps: list[int] = dataclasses.field(default_factory=list)
    skipped: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (step, reason)
    results_path: Path | None = None


def _block_of(path: str) -> int:
    parts = path.split("/")
    return int(parts[1]) + 1 if parts[0] == "blocks" else -1


def expected_keys(name: str, entry: Any, mcfg: ModelConfig, weight_paths: Iterable[str]) -> set[RowKey]:
    """Every (probe, layer, head, metric) row that probe entry ``name`` writes per checkpoint."""
    kind = entry["type"]
    if kind == "representation":
        metrics = REPRESENTATION_METRICS + (("dse_bits",) if entry.get("dse_sigma", 0) else ())
        return {(name, layer, -1, m) for layer in range(mcfg.num_layers + 1) for m in metrics}
    if kind == "attention":
        return {(name, layer, head, m) for layer in range(1, mcfg.num_layers + 1)
                for head in range(-1, mcfg.num_heads) for m in ATTENTION_METRICS}
    if kind == "weights":
        return {(name, _block_of(p), -1, f"{p}/{s}") for p in weight_paths for s in WEIGHT_STATS}
    if kind == "output":
        return {(name, -1, -1, m) for m in OUTPUT_METRICS}
    raise ValueError(f"probe {name!r} has unknown type {kind!r}; valid types: {PROBE_TYPES}")


def _attention_values(name: str, out: dict[str, np.ndarray]) -> dict[RowKey, float]:
    values = {}
    for metric in ATTENTION_METRICS:
        per_head = out[f"attention/{metric}"].mean(axis=0)  # L x H (NaN: bound undefined, e.g. rope)
        for layer, heads in enumerate(per_head, start=1):
            values[(name, layer, -1, metric)] = float(np.mean(heads))
            values.update({(name, layer, h, metric): float(v) for h, v in enumerate(heads)})
    return values


def _representation_values(name, entry, reps_NxLxD, mesh, spectra) -> dict[RowKey, float]:
    values = {}
    fit = entry.get("alpha_fit_range")
    for layer in range(reps_NxLxD.shape[1]):
        x = reps_NxLxD[:, layer]
        m = spectral_metrics(x, mesh=mesh, alpha_fit_range=tuple(fit) if fit else None)
        spectra[f"{name}_layer{layer}"] = m["spectrum"]
        values.update({(name, layer, -1, k): m[k] for k in REPRESENTATION_METRICS})
        if entry.get("dse_sigma", 0):
            dse = diffusion_spectral_entropy(x, sigma=entry["dse_sigma"], mesh=mesh)
            values[(name, layer, -1, "dse_bits")] = float(dse)
    return values


def compute_values(name, entry, out, params, mesh, spectra) -> dict[RowKey, float]:
    kind = entry["type"]
    if kind == "representation":
        return _representation_values(name, entry, out[entry.get("position", "last")], mesh, spectra)
    if kind == "attention":
        return _attention_values(name, out)
    if kind == "weights":
        return {(name, _block_of(p), -1, f"{p}/{s}"): float(v[s])
                for p, v in weight_spectra(nnx.to_pure_dict(params)).items() for s in WEIGHT_STATS}
    return {(name, -1, -1, m): float(np.mean(out[m])) for m in OUTPUT_METRICS}


def params_hash(params: Any) -> str:
    """sha256 (first 16 hex digits) of the parameter bytes: identifies a checkpoint's content."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()[:16]


def fixed_probe_set(workdir: Path, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """The run's fixed probe tokens, saved once with their hash; later sweeps must match it."""
    corpus = data.load_corpus(cfg.data, cfg.train.seq_len)
    tokens, digest = data.probe_set(corpus, cfg.probe_set.num_sequences)
    path = workdir / "probes" / "probe_set.npz"
    if path.exists():
        saved = np.load(path)
        if str(saved["sha256"]) != digest:
            raise ValueError(f"the probe set in {path} (sha256 {saved['sha256']}) differs from the one the "
                             f"run's data config gives now ({digest}); the corpus changed: use a new workdir")
    elif jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, tokens=tokens, sha256=digest)
    return tokens


def _rows(values: dict[RowKey, float], missing: set[RowKey], base: dict) -> list[dict]:
    return [{**base, "probe": p, "layer": layer, "head": head, "metric": m, "value": v}
            for (p, layer, head, m), v in sorted(values.items()) if (p, layer, head, m) in missing]


def _save_spectra(directory: Path, step: int, spectra: dict[str, np.ndarray]) -> None:
    if not spectra or jax.process_index() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"step_{step:08d}.npz"
    if path.exists():
        spectra = {**dict(np.load(path)), **spectra}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **spectra)
    tmp.replace(path)


def sweep(workdir: str | Path, probe_config: ml_collections.ConfigDict | None = None,
          mesh: jax.sharding.Mesh | None = None) -> SweepReport:
    """Probe all checkpoints in ``workdir``; ``probe_config`` (``probe_set`` + ``probes``) defaults
    to the run's own config saved in its latest checkpoint."""
    workdir = Path(workdir).absolute()
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        steps = ckpts.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoints in {ckpts.directory}: train first (experiments/pretrain.py)")
        run = _Sweep(workdir, ckpts, ckpts.read_meta(steps[-1]), probe_config, mesh or make_mesh())
        for step in tqdm(steps, desc="checkpoints", unit="ckpt", disable=not sys.stderr.isatty()):
            try:
                run.probe(step)
            except CheckpointReadError as e:
                logging.error("skipping step %d: %s", step, e)
                run.report.skipped.append((step, str(e)))
    finally:
        ckpts.close()
    run.report.results_path = run.table.path
    return run.report


class _Sweep:
    """What every checkpoint of one run shares: model skeleton, probe set, expected rows, table."""

    def __init__(self, workdir: Path, ckpts: Checkpoints, meta: dict, probe_config, mesh):
        cfg = ml_collections.ConfigDict(meta["config"])
        if probe_config is not None:
            cfg.probe_set, cfg.probes = probe_config.probe_set, probe_config.probes
        mcfg = ModelConfig(**meta["model_config"])
        self.graphdef, self.abstract = abstract_model(mcfg, mesh)
        weight_paths = [param_path(p) for p, leaf in jax.tree_util.tree_flatten_with_path(
            nnx.to_pure_dict(self.abstract))[0] if len(leaf.shape) >= 2]
        self.entries = {name: cfg.probes[name] for name in cfg.probes}
        self.expected = {n: expected_keys(n, e, mcfg, weight_paths) for n, e in self.entries.items()}
        self.attention_examples = max((e.get("num_examples", DEFAULT_ATTENTION_EXAMPLES)
                                       for e in self.entries.values() if e["type"] == "attention"), default=0)
        self.tokens = fixed_probe_set(workdir, cfg)
        self.batch_size, self.mesh, self.ckpts, self.workdir = cfg.probe_set.batch_size, mesh, ckpts, workdir
        self.table, self.report = ResultsTable(workdir), SweepReport()

    def probe(self, step: int) -> None:
        """Compute and append the rows of checkpoint ``step`` that the table lacks."""
        meta = self.ckpts.read_meta(step)
        present = self.table.present(self.workdir.name, meta["stage"], step)
        todo = {n: keys - present for n, keys in self.expected.items() if keys - present}
        if not todo:
            return
        params = self.ckpts.restore_params(step, self.abstract)
        attention = self.attention_examples if any(self.entries[n]["type"] == "attention" for n in todo) else 0
        out = probe_forward(self.graphdef, params, self.tokens, self.mesh, self.batch_size, attention)
        base = {"run": self.workdir.name, "stage": meta["stage"], "step": step,
                "tokens_seen": meta["tokens_seen"], "ckpt_hash": params_hash(params)}
        spectra, rows = {}, []
        for name, missing in todo.items():
            rows += _rows(compute_values(name, self.entries[name], out, params, self.mesh, spectra), missing, base)
        _save_spectra(self.workdir / "probes" / "spectra", step, spectra)
        added = self.table.append(rows) if jax.process_index() == 0 else 0
        self.report.rows_added += added
        self.report.probed_steps.append(step)
        logging.info("probed step %d (%d tokens): %d rows -> %s", step, meta["tokens_seen"], added, self.table.path)
