"""Probe types as registered evaluators (big_vision's evaluator style).

A config entry ``config.probes.<name> = dict(type=<key of EVALUATORS>, **kwargs)`` becomes
``EVALUATORS[type](name, entry, model_info)``. An evaluator reads and checks its own kwargs in
its constructor (raising :class:`ProbeConfigError`, one line), so the config check
(:func:`check_probes`) only constructs each entry and names no type. Each evaluator declares
the rows it writes per checkpoint (:meth:`Evaluator.expected_keys`), what it reads from the
forward passes (:meth:`Evaluator.reads`; the passes compute the union), and computes its rows
(:meth:`Evaluator.run`, yielding ``(key, value, note)``; ``note`` says why a value is NaN or a
limit, "" otherwise). A new probe type is one class and one :func:`register_evaluator` call.
The same evaluators run over saved checkpoints (the sweep) and inside training
(``in_training=True`` entries).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

import jax
import numpy as np
from flax import nnx

from entropy_jax.errors import UserError, did_you_mean
from entropy_jax.probes.diffusion import dse_sample, median_distance
from entropy_jax.probes.diffusion_slq import EXACT_MAX_SAMPLES, dse_estimate
from entropy_jax.probes.spectra import spectral_metrics
from entropy_jax.probes.weights import param_path, weight_spectra
from entropy_jax.sweep.forward import ATTENTION_METRICS, EXACT_NORMS_KEY, NORM_METHODS, TASK_PROMPTS, Reads
from entropy_jax.sweep.table import RowKey

Row = tuple[RowKey, float, str]
INPUTS = ("probe_set", TASK_PROMPTS)  # what a representation probe reads


class ProbeConfigError(UserError, ValueError):
    """A probe entry's type or kwargs are invalid (one line naming ``probes.<name>.<key>``)."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What evaluators need to know about the model to name their rows."""

    num_layers: int
    num_heads: int
    weight_paths: tuple[str, ...]  # params with ndim >= 2, as "blocks/0/attn/query/kernel"


@dataclasses.dataclass
class Context:
    """One checkpoint's inputs to the evaluators."""

    forward: dict[str, np.ndarray]  # per-example outputs of entropy_jax.sweep.forward.probe_forward
    params: nnx.State
    mesh: jax.sharding.Mesh
    spectra: dict[str, np.ndarray]  # filled by evaluators: saved to probes/spectra/step_*.npz


class Evaluator:
    """Base class: ``name`` (the config entry), ``entry`` (its kwargs), ``info`` (the model; None
    when constructed only to check the kwargs). A subclass reads and checks its kwargs in its
    constructor, cheaply (no data, no compilation), refusing a bad one with :meth:`refuse`."""

    def __init__(self, name: str, entry: Mapping[str, Any], info: ModelInfo | None = None):
        self.name, self.entry, self.info = name, dict(entry), info

    def refuse(self, setting: str, requirement: str) -> NoReturn:
        """``ProbeConfigError("probes.<name>.<setting> <requirement>")``, e.g. setting ``"k=0"``."""
        raise ProbeConfigError(f"probes.{self.name}.{setting} {requirement}")

    @property
    def in_training(self) -> bool:
        return bool(self.entry.get("in_training", False))

    def reads(self) -> Reads:
        """What :meth:`run` reads from the forward passes (here: the pass over the whole probe set)."""
        return Reads(probe_set=True)

    def expected_keys(self) -> set[RowKey]:
        raise NotImplementedError

    def run(self, ctx: Context) -> Iterator[Row]:
        raise NotImplementedError


class Representation(Evaluator):
    """Spectra of the residual stream of every layer (0 = embedding output, L = after the final norm).

    kwargs: ``position`` "last" | "mean"; ``inputs`` "probe_set" (default: the lineage root's probe
    sequences) | "task_prompts" (a fine-tuning stage's held-out task prompts, whose last token is the
    last prompt token: the task's own manifold); ``alpha_fit_range`` (0-based [start, stop), None: the
    library default). Diffusion spectral entropy (docs/metrics.md), on ``dse_samples`` rows (a
    seeded draw when there are more; 0: no DSE rows): ``dse_bits`` at the median pairwise distance
    (rows ``dse_sigma``, ``dse_n``) and ``dse_bits_sigma<dse_sigma>`` at the fixed width
    ``dse_sigma`` (0: none); exact up to ``dse_exact_max`` rows, the SLQ estimate above (``note``).
    """

    METRICS = ("rankme", "rankme_cov", "alpha_req", "alpha_req_r2", "alpha_req_r2_window", "alpha_req_fit_start",
               "alpha_req_fit_stop", "von_neumann_entropy", "von_neumann_entropy_uncentred")
    _FROM_RESULT = {"alpha_req_fit_start": "alpha_fit_start", "alpha_req_fit_stop": "alpha_fit_stop"}
    DSE_DEFAULTS = {"dse_samples": 512, "dse_seed": 0, "dse_sigma": 10.0, "dse_exact_max": EXACT_MAX_SAMPLES}

    def __init__(self, name: str, entry: Mapping[str, Any], info: ModelInfo | None = None):
        super().__init__(name, entry, info)
        self.position = self.entry.get("position", "last")
        if self.position not in ("last", "mean"):
            self.refuse(f"position={self.position!r}", "must be 'last' or 'mean'")
        self.inputs = self.entry.get("inputs", "probe_set")
        if self.inputs not in INPUTS:
            self.refuse(f"inputs={self.inputs!r}", f"must be one of {', '.join(map(repr, INPUTS))}")
        fit = self.entry.get("alpha_fit_range")
        if fit is not None and not (len(fit) == 2 and 0 <= fit[0] < fit[1]):
            self.refuse(f"alpha_fit_range={tuple(fit)}", "must be (start, stop) with 0 <= start < stop, or None")
        self.alpha_fit_range = tuple(fit) if fit else None
        samples, sigma = self.dse_option("dse_samples"), self.dse_option("dse_sigma")
        if not isinstance(samples, int) or samples < 0 or samples == 1:
            self.refuse(f"dse_samples={samples!r}", "must be an integer >= 2 (0 = no DSE rows)")
        if not (math.isfinite(sigma) and sigma >= 0):
            self.refuse(f"dse_sigma={sigma}", "must be >= 0 (0 = no diffusion spectral entropy)")

    def reads(self) -> Reads:
        return Reads(task_prompts=True) if self.inputs == TASK_PROMPTS else Reads(probe_set=True)

    def dse_option(self, key: str) -> Any:
        value = self.entry.get(key)
        return self.DSE_DEFAULTS[key] if value is None else value

    def dse_metrics(self) -> tuple[str, ...]:
        if not self.dse_option("dse_samples"):
            return ()
        fixed = float(self.dse_option("dse_sigma"))
        return ("dse_bits", "dse_sigma", "dse_n") + ((f"dse_bits_sigma{fixed:g}",) if fixed > 0 else ())

    def metrics(self) -> tuple[str, ...]:
        return self.METRICS + self.dse_metrics()

    def expected_keys(self) -> set[RowKey]:
        return {(self.name, layer, -1, m) for layer in range(self.info.num_layers + 1) for m in self.metrics()}

    def run(self, ctx: Context) -> Iterator[Row]:
        reps_NxLxD = ctx.forward[self.position if self.inputs == "probe_set" else f"{TASK_PROMPTS}/{self.position}"]
        for layer in range(reps_NxLxD.shape[1]):
            x = reps_NxLxD[:, layer]
            m = spectral_metrics(x, mesh=ctx.mesh, alpha_fit_range=self.alpha_fit_range)
            ctx.spectra[f"{self.name}_layer{layer}"] = m["spectrum"]
            notes = m.get("notes", {})
            for metric in self.METRICS:
                key = self._FROM_RESULT.get(metric, metric)
                note = notes.get(metric, notes.get("alpha_req", "") if metric.startswith("alpha_req") else "")
                yield (self.name, layer, -1, metric), float(m.get(key, math.nan)), note
            if self.dse_metrics():
                for metric, value, note in self.dse_rows(x, ctx.mesh):
                    yield (self.name, layer, -1, metric), value, note

    def dse_rows(self, x: np.ndarray, mesh: jax.sharding.Mesh | None) -> Iterator[tuple[str, float, str]]:
        """``(metric, value, note)`` of the DSE rows of one layer's N x D representations."""
        seed, exact_max = self.dse_option("dse_seed"), int(self.dse_option("dse_exact_max"))
        xs = dse_sample(x, int(self.dse_option("dse_samples")), seed)
        sigma = median_distance(xs, seed=seed)
        yield "dse_n", float(len(xs)), ""
        yield "dse_sigma", sigma, f"median pairwise distance of {min(len(xs), 2048)} rows"
        if sigma > 0:
            est = dse_estimate(xs, sigma, exact_max=exact_max, seed=seed, mesh=mesh)
            yield "dse_bits", est.bits, est.note()
        elif np.ptp(xs, axis=0).max() == 0:
            yield "dse_bits", 0.0, "all sampled rows coincide: one point, DSE = 0 (limit)"
        else:
            yield "dse_bits", math.nan, "median pairwise distance is 0 (most sampled rows coincide): no bandwidth"
        fixed = float(self.dse_option("dse_sigma"))
        if fixed > 0:
            est = dse_estimate(xs, fixed, exact_max=exact_max, seed=seed, mesh=mesh)
            yield f"dse_bits_sigma{fixed:g}", est.bits, est.note()


class Attention(Evaluator):
    """Per block (layer 1..L) and head (head -1 = mean over heads): attention entropy, its
    normalisation by ln T_i, and the three Theorem 3.1 bounds (nats), over the first
    ``num_examples`` probe sequences.

    kwargs: ``num_examples`` (default 128); ``norm`` "certified" (default: certified upper
    bounds on the spectral norms of the logit matrix and of X, O(T^2 k) per head and sequence)
    or "exact" (``eigvalsh``, O(T^3)); the bound rows' note says which the forward pass used
    (``norm=certified`` or ``norm=exact``).
    """

    DEFAULT_EXAMPLES = 128
    DEFAULT_NORM = "certified"
    _NORM_BOUNDS = ("attention_entropy_bound_logits", "attention_entropy_bound_weights")

    def __init__(self, name: str, entry: Mapping[str, Any], info: ModelInfo | None = None):
        super().__init__(name, entry, info)
        self.num_examples = int(self.entry.get("num_examples", self.DEFAULT_EXAMPLES))
        if self.num_examples < 1:
            self.refuse(f"num_examples={self.entry['num_examples']}", "must be >= 1")
        self.norm = str(self.entry.get("norm", self.DEFAULT_NORM))
        if self.norm not in NORM_METHODS:
            raise ProbeConfigError(f"probe {name!r}: norm must be one of {NORM_METHODS}, got {self.norm!r}")

    def reads(self) -> Reads:
        return Reads(attention_examples=self.num_examples, attention_norm=self.norm)

    def expected_keys(self) -> set[RowKey]:
        return {(self.name, layer, head, m) for layer in range(1, self.info.num_layers + 1)
                for head in range(-1, self.info.num_heads) for m in ATTENTION_METRICS}

    def run(self, ctx: Context) -> Iterator[Row]:
        used = "exact" if np.all(ctx.forward[EXACT_NORMS_KEY] == 1.0) else "certified"
        if used != self.norm:
            raise ValueError(f"probe {self.name!r} asks for norm={self.norm!r} but the forward pass took {used} "
                             f"norms; pass the probe's reads() to probe_forward")
        for metric in ATTENTION_METRICS:  # the pass may cover more sequences, for another attention probe
            per_head = ctx.forward[f"attention/{metric}"][: self.num_examples].mean(axis=0)  # L x H
            for layer, heads in enumerate(per_head, start=1):
                note = f"norm={used}" if metric in self._NORM_BOUNDS else ""
                if not np.isfinite(heads).all():
                    note = "no bilinear form W_Q W_K^T (rotary positions or attention biases)"
                yield (self.name, layer, -1, metric), float(np.mean(heads)), note
                for h, v in enumerate(heads):
                    yield (self.name, layer, h, metric), float(v), note


class Weights(Evaluator):
    """Spectral/Frobenius norm, stable rank, condition number of every weight matrix; metric
    ``<param path>/<statistic>``, layer = its block (1..L) or -1."""

    STATS = ("spectral_norm", "frobenius_norm", "stable_rank", "condition_number")

    def reads(self) -> Reads:
        return Reads()  # the parameters only

    @staticmethod
    def block_of(path: str) -> int:
        parts = path.split("/")
        return int(parts[1]) + 1 if parts[0] == "blocks" else -1

    def expected_keys(self) -> set[RowKey]:
        return {(self.name, self.block_of(p), -1, f"{p}/{s}") for p in self.info.weight_paths for s in self.STATS}

    def run(self, ctx: Context) -> Iterator[Row]:
        for p, v in weight_spectra(nnx.to_pure_dict(ctx.params)).items():
            for s in self.STATS:
                yield (self.name, self.block_of(p), -1, f"{p}/{s}"), float(v[s]), ""


class Output(Evaluator):
    """Mean predictive (next-token) entropy over positions and at the last one (nats)."""

    METRICS = ("predictive_entropy", "predictive_entropy_last")

    def expected_keys(self) -> set[RowKey]:
        return {(self.name, -1, -1, m) for m in self.METRICS}

    def run(self, ctx: Context) -> Iterator[Row]:
        for m in self.METRICS:
            yield (self.name, -1, -1, m), float(np.mean(ctx.forward[m])), ""


EVALUATORS: dict[str, type[Evaluator]] = {
    "representation": Representation, "attention": Attention, "weights": Weights, "output": Output,
}


def register_evaluator(kind: str, cls: type[Evaluator]) -> None:
    """Make ``config.probes.<name> = dict(type=kind, ...)`` run ``cls``."""
    EVALUATORS[kind] = cls


def make_evaluator(name: str, entry: Mapping[str, Any], info: ModelInfo | None = None) -> Evaluator:
    """The evaluator of config entry ``probes.<name>`` (its constructor checks its kwargs)."""
    entry = entry.to_dict() if hasattr(entry, "to_dict") else dict(entry)
    kind = entry.get("type")
    if kind not in EVALUATORS:
        raise ProbeConfigError(f"probes.{name}.type={kind!r} is not a probe type{did_you_mean(str(kind), EVALUATORS)} "
                               f"(registered: {', '.join(sorted(EVALUATORS))})")
    return EVALUATORS[kind](name, entry, info)


def make_evaluators(probes: Mapping[str, Mapping[str, Any]], info: ModelInfo | None = None) -> dict[str, Evaluator]:
    """One evaluator per config entry, checked (their kwargs, and that their reads fit one set of
    forward passes); ``info`` None: for checking only (no rows can be named)."""
    out, reads = {}, Reads()
    for name, entry in probes.items():
        out[name] = make_evaluator(name, entry, info)
        try:
            reads |= out[name].reads()
        except ValueError as e:
            raise ProbeConfigError(f"probes.{name}: {e}") from e
    return out


def check_probes(probes: Mapping[str, Mapping[str, Any]], data_name: str | None = None) -> None:
    """The config check of a ``probes`` section: every entry constructed (cheap), nothing run; with
    the run's ``data_name``, an entry reading task prompts is refused for a run without a task."""
    for name, evaluator in make_evaluators(probes).items():
        if data_name is not None and evaluator.reads().task_prompts and data_name != "tasks":
            raise ProbeConfigError(f"probes.{name}.inputs={TASK_PROMPTS!r} reads a fine-tuning stage's held-out task "
                                   f"prompts, but this run trains on data.name={data_name!r}, which has none: drop "
                                   "the entry, or use it in a stage on data.name='tasks'")


def model_info(abstract_params: nnx.State, num_layers: int, num_heads: int) -> ModelInfo:
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_params))[0]
    return ModelInfo(num_layers, num_heads, tuple(param_path(p) for p, leaf in flat if len(leaf.shape) >= 2))
