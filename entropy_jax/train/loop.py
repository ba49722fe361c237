"""The training loop: data -> sharded jitted step -> metrics.jsonl and log-spaced Orbax checkpoints.

``train(config, workdir)`` is idempotent given the workdir. Where it starts, in this order:
1. the workdir's own latest checkpoint (parameters, model state, optimiser, RNG, step and
   data-iterator position), so a run killed at any point and started again with the same
   command produces exactly the uninterrupted result;
2. else ``config.init_from.workdir`` (a parent run; ``init_from.step`` -1 = its latest
   checkpoint): its parameters and model state, a fresh optimiser, step 0, and the parent
   recorded in every checkpoint's metadata (tokens seen continue from the parent's);
3. else a fresh initialisation from ``config.seed``.

A resume is refused when the config's resume keys or the corpus fingerprint differ from the
saved ones. The process holds the workdir's lock throughout (a second writer is refused), and
SIGINT/SIGTERM stop it cleanly between steps: the pending checkpoint save completes, and
:class:`TrainingInterrupted` carries exit status 130/143; rerunning resumes exactly. A second
signal exits at once (saves are atomic, so that loses nothing but the pending step).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from entropy_jax import data
from entropy_jax.checkpoint import CheckpointReadError, Checkpoints, corpus_fingerprint, is_save_step
from entropy_jax.errors import UserError
from entropy_jax.models import abstract_like, abstract_model, init_model
from entropy_jax.sharding import is_writer, make_mesh, replicated, shard_batch
from entropy_jax.train.interrupt import StopSignals, TrainingInterrupted
from entropy_jax.train.metric_writer import MetricWriter, read_metrics
from entropy_jax.train.objective import make_loss
from entropy_jax.train.optim import make_optimizer, make_schedule
from entropy_jax.train.start import Parent, Start, plan_start
from entropy_jax.train.step import TrainState, init_state, make_flat_train_block, make_flat_train_step
from entropy_jax.train.task_eval import task_evaluation

# Called in the training process at its probe steps (train.probe_every): (step, state, metadata).
ProbeHook = Callable[[int, TrainState, dict], None]


@dataclasses.dataclass(frozen=True)
class TrainResult:
    workdir: Path
    final_step: int
    final_loss: float | None
    entropy_rate: float | None
    checkpoint_steps: list[int]
    resumed_from: int | None


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where a run comes from: fixed at its step 0 and carried by every checkpoint's metadata."""

    run_id: str
    stage: str
    parent: dict | None = None  # {run_id, workdir, step, stage} of the checkpoint it started from
    tokens_at_start: int = 0  # tokens the parent had seen: the lineage's shared axis
    probe_source: dict | None = None  # the lineage root's data + probe_set config (same probe sequences)


class _Progress:
    """A tqdm bar on a terminal; plain log lines (about 20 per run) otherwise."""

    def __init__(self, start: int, total: int):
        self.total, self.tty = total, sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, disable=not self.tty)
        self.every = max(1, total // 20)

    def update(self, step: int, loss: float, gap: float | None) -> None:
        text = f"loss {loss:.4f}" + ("" if gap is None else f" ({gap:+.4f} vs entropy rate)")
        if self.tty:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif step % self.every == 0 or step == self.total:
            logging.info("step %d/%d: %s", step, self.total, text)

    def close(self) -> None:
        self.bar.close()


def child_lineage(parent: Parent, run_id: str, stage: str) -> Lineage:
    """The lineage of a stage ``stage`` (run ``run_id``) starting from ``parent``: tokens continue from
    the parent's, the probe sequences are the lineage root's. Native fine-tuning runs and imported
    published stages (experiments/import_hf.py --parent) record the same."""
    meta = parent.meta
    return Lineage(
        run_id=run_id, stage=stage,
        parent={"run_id": meta.get("run_id", parent.workdir.name), "workdir": str(parent.workdir),
                "step": parent.step, "stage": meta["stage"]},
        tokens_at_start=int(meta["tokens_seen"]),
        probe_source=meta.get("probe_source") or probe_source_of(meta["config"]),
    )


def probe_source_of(config: dict) -> dict:
    """What fixes a run's probe sequences (``config``: a saved config dict): its data config,
    sequence length and probe-set size."""
    return {"data": dict(config["data"]), "seq_len": config["train"]["seq_len"],
            "probe_set": dict(config["probe_set"])}


class _Run:
    """One training run's fixed parts: config, corpus, model skeleton, optimiser, checkpoints."""

    def __init__(self, start: Start):
        cfg = start.config
        self.cfg, self.workdir, self.corpus, self.mcfg = cfg, start.workdir, start.corpus, cfg.model
        self.mesh = make_mesh()
        self.tx, self.schedule = make_optimizer(cfg.train), make_schedule(cfg.train)
        self.graphdef, self.params_target, self.model_state_target = abstract_model(self.mcfg, self.mesh)
        self.iterator = data.make_train_iterator(self.corpus, cfg.train.batch_size, cfg.seed)
        self.ckpts = Checkpoints(self.workdir, cfg.checkpoint.max_to_keep)
        self.tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
        # A fine-tuning stage's held-out task metrics, written with every checkpoint's row.
        self.evaluate = task_evaluation(self.graphdef, self.corpus, cfg.train.loss, cfg.seed)

    def meta(self, step: int, lineage: Lineage) -> dict:
        return {
            "step": step,
            "tokens_seen": lineage.tokens_at_start + step * self.tokens_per_step,
            "stage": lineage.stage,
            "run_id": lineage.run_id,
            "parent": lineage.parent,
            "tokens_at_start": lineage.tokens_at_start,
            "probe_source": lineage.probe_source,
            "config": self.cfg.raw,
            "model_config": dataclasses.asdict(self.mcfg),
            "corpus": self.corpus.info,
            "corpus_fingerprint": corpus_fingerprint(self.corpus.info),
            "entropy_rate": self.corpus.entropy_rate,
        }

    def save(self, state: TrainState, lineage: Lineage) -> dict:
        step = int(state.step)
        meta = self.meta(step, lineage)
        self.ckpts.save(step, arrays={"params": state.params, "model_state": state.model_state,
                                      "opt_state": state.opt_state, "rng": {"key": state.rng}},
                        json={"data": self.iterator.get_state(), "meta": meta})
        return meta

    def replicated(self, tree: Any) -> Any:
        return jax.device_put(tree, replicated(self.mesh))

    def keep_earlier_checkpoints(self, saved: dict) -> None:
        """Checkpoints saved under another retention (e.g. keep-all) are never pruned by this one."""
        keep = self.cfg.checkpoint.max_to_keep
        saved_keep = saved["config"].get("checkpoint", {}).get("max_to_keep", 0)
        if keep and saved_keep != keep:
            steps = self.ckpts.all_steps()
            self.ckpts.protect(steps)
            logging.info("keeping the %d checkpoints saved with checkpoint.max_to_keep=%s; "
                         "max_to_keep=%d applies to new ones only", len(steps), saved_keep, keep)

    def resume(self, step: int, saved: dict) -> tuple[TrainState, Lineage]:
        self.keep_earlier_checkpoints(saved)
        opt_target = abstract_like(jax.eval_shape(self.tx.init, self.params_target), replicated(self.mesh))
        rng_target = {"key": jax.ShapeDtypeStruct((2,), jax.numpy.uint32, sharding=replicated(self.mesh))}
        r = self.ckpts.restore(step, arrays={"params": self.params_target, "model_state": self.model_state_target,
                                             "opt_state": opt_target, "rng": rng_target}, json=["data"])
        self.iterator.set_state(r["data"])
        logging.info("resumed from step %d in %s", step, self.ckpts.directory)
        state = TrainState(step=self.replicated(jax.numpy.asarray(step, jax.numpy.int32)), params=r["params"],
                           model_state=r["model_state"], opt_state=r["opt_state"], rng=r["rng"]["key"])
        lineage = Lineage(run_id=saved.get("run_id", self.workdir.run_id()), stage=saved["stage"],
                          parent=saved.get("parent"), tokens_at_start=saved.get("tokens_at_start", 0),
                          probe_source=saved.get("probe_source"))
        return state, lineage

    def init_from_parent(self, parent: Parent) -> tuple[TrainState, Lineage]:
        with Checkpoints(parent.workdir, read_only=True) as ckpts:
            try:
                r = ckpts.restore(parent.step, arrays={"params": self.params_target,
                                                       "model_state": self.model_state_target})
            except CheckpointReadError as e:
                others = [s for s in ckpts.all_steps() if s != parent.step]
                hint = f" (it has steps {', '.join(map(str, others))})" if others else ""
                raise CheckpointReadError(
                    f"parent {parent.workdir} step {parent.step} cannot be read: its files are truncated or "
                    f"damaged; start from another of its checkpoints with --init_step{hint}") from e
        logging.info("initialised from %s step %d (stage %s)", parent.workdir.checkpoints, parent.step,
                     parent.meta["stage"])
        state = init_state(r["params"], r["model_state"], self.tx, self.cfg.seed)
        lineage = child_lineage(parent, self.workdir.run_id(create=jax.process_index() == 0), self.cfg.stage)
        return self.replicated(state), lineage

    def scratch(self) -> tuple[TrainState, Lineage]:
        _, params, model_state = init_model(self.mcfg, self.cfg.seed)
        lineage = Lineage(run_id=self.workdir.run_id(create=jax.process_index() == 0), stage=self.cfg.stage)
        return self.replicated(init_state(params, model_state, self.tx, self.cfg.seed)), lineage


def train(cfg: Any, workdir: str | os.PathLike, on_probe_step: ProbeHook | None = None) -> TrainResult:
    """Train ``cfg`` (a ConfigDict or RunConfig) into ``workdir``: :func:`plan_start`, then :func:`run`."""
    return run(plan_start(cfg, workdir), on_probe_step)


def run(start: Start, on_probe_step: ProbeHook | None = None) -> TrainResult:
    """Train from ``start`` (resume, init from a parent, or scratch); see the module doc.

    Raises:
      WorkdirBusyError: another process holds the workdir's lock.
      TrainingInterrupted: SIGINT or SIGTERM arrived; the run stopped cleanly between steps.
    """
    with start.workdir.lock("training", enabled=is_writer()), StopSignals() as stop:
        return _train(start, on_probe_step, stop)


def _train(start: Start, on_probe_step: ProbeHook | None, stop: StopSignals) -> TrainResult:
    run, cfg, wd = _Run(start), start.config, start.workdir
    try:
        latest = run.ckpts.latest_step()
        if latest != start.resume_step:  # another writer saved between the plan and the lock
            raise UserError(f"{wd.checkpoints} changed while this run started (latest step {latest}, "
                            f"planned {start.resume_step}): rerun the command")
        if latest is not None:
            state, lineage = run.resume(latest, start.resume_meta)
        elif start.parent is not None:
            state, lineage = run.init_from_parent(start.parent)
        else:
            state, lineage = run.scratch()
        if latest is None:
            meta = run.save(state, lineage)
            if on_probe_step is not None and cfg.train.probe_every:
                on_probe_step(0, state, meta)
        writer = MetricWriter(wd.metrics, resume_step=latest or 0,
                              tensorboard=wd.tensorboard if cfg.train.tensorboard else None)
        if latest is None and run.evaluate is not None:  # the stage's starting point
            evaluated = run.evaluate(state.params, state.model_state, 0)
            writer.write(0, {**evaluated, "tokens_seen": lineage.tokens_at_start})
        try:
            last = _loop(run, state, lineage, writer, latest or 0, on_probe_step, stop)
        finally:
            writer.close()
    finally:
        run.ckpts.close()  # waits for the pending save: an interrupted run keeps its last checkpoint
    if stop.signum is not None:
        raise TrainingInterrupted(stop.signum, last["step"], run.ckpts.latest_step(), run.ckpts.directory)
    last_loss = last["loss"]
    if last_loss is None and wd.metrics.exists():  # nothing left to train: report the log
        rows = read_metrics(wd.metrics)
        last_loss = rows[-1]["loss"] if rows else None
    return TrainResult(wd.root, cfg.train.steps, last_loss, run.corpus.entropy_rate, run.ckpts.all_steps(), latest)


def _probe_step(step: int, saved: bool, probe_every: int) -> bool:
    """-1: at every checkpoint; 0: never; N > 0: every N steps."""
    return saved if probe_every < 0 else probe_every > 0 and step % probe_every == 0


def _loop(run: _Run, state: TrainState, lineage: Lineage, writer: MetricWriter, start: int,
          on_probe_step: ProbeHook | None, stop: StopSignals) -> dict[str, Any]:
    """Steps ``start+1 .. train.steps``, or until a stop signal. Step t is dispatched before step
    t-1's metrics are pulled. Returns the last step done, its loss and the last saved step.

    The state travels as its flat list of arrays (``make_flat_train_step``): rebuilding the
    ``nnx.State`` trees on every call is host work that, on CPU, competes with the step for the
    same cores. It is rebuilt only where it is saved or probed.
    """
    cfg = run.cfg
    total, ck = cfg.train.steps, cfg.checkpoint
    leaves, treedef = jax.tree.flatten(state)
    del state  # its arrays are donated to the first step
    loss_fn, per_call = make_loss(cfg.train.loss), cfg.train.steps_per_call
    train_step = make_flat_train_step(run.graphdef, run.tx, run.schedule, loss_fn, treedef)
    train_block = make_flat_train_block(run.graphdef, run.tx, run.schedule, loss_fn, treedef) if per_call > 1 else None
    progress, pending, last = _Progress(start, total), None, {"loss": None, "saved": start, "step": start}
    window = collections.deque([(start, time.perf_counter())], maxlen=21)  # rate over the last 20 steps
    entropy_rate = run.corpus.entropy_rate

    def pull(step: int, metrics: dict, evaluated: dict | None = None) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
            raise FloatingPointError(
                f"training diverged at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}. The last "
                f"good checkpoint is step {last['saved']} in {run.ckpts.directory}; lower train.lr or raise "
                "train.warmup_steps, and use a new --workdir (or delete the later steps) to retry."
            )
        gap = None if entropy_rate is None else m["loss"] - entropy_rate
        window.append((step, time.perf_counter()))
        if step % cfg.train.log_every == 0 or step == total or evaluated:
            rate = (step - window[0][0]) / max(window[-1][1] - window[0][1], 1e-9)
            writer.write(step, {**m, "loss_minus_entropy_rate": gap,
                                "tokens_seen": lineage.tokens_at_start + step * run.tokens_per_step,
                                "steps_per_sec": rate, "tokens_per_sec": rate * run.tokens_per_step,
                                **(evaluated or {})})
        progress.update(step, m["loss"], gap)
        last["loss"] = m["loss"]

    def pull_all(first: int, metrics: dict, evaluated: dict | None = None) -> None:
        """Steps ``first ..`` of one call (metrics stacked on a leading axis after a block)."""
        host = jax.device_get(metrics)
        if np.ndim(host["loss"]) == 0:
            return pull(first, host, evaluated)
        n = len(host["loss"])
        for i in range(n):
            pull(first + i, {k: v[i] for k, v in host.items()}, evaluated if i == n - 1 else None)

    def stops_at(step: int) -> bool:
        """Whether the loop must hold the state after ``step`` (a checkpoint or a probe step)."""
        save = is_save_step(step, total, ck.dense_until, ck.every)
        return save or (on_probe_step is not None and _probe_step(step, save, cfg.train.probe_every))

    try:
        step = start
        while step < total and stop.signum is None:
            n = per_call if step + per_call <= total and not any(map(stops_at, range(step + 1, step + per_call))) else 1
            first = step + 1
            if n == 1:
                leaves, metrics = train_step(leaves, shard_batch(next(run.iterator), run.mesh))
            else:
                batches = [next(run.iterator) for _ in range(n)]
                block = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
                leaves, metrics = train_block(leaves, shard_batch(block, run.mesh, axis=1))
            step = last["step"] = step + n
            if pending is not None:
                pull_all(*pending)
            pending = (first, metrics)
            save = is_save_step(step, total, ck.dense_until, ck.every)
            if save:
                saved_state = jax.tree.unflatten(treedef, leaves)
                evaluated = None if run.evaluate is None else run.evaluate(
                    saved_state.params, saved_state.model_state, step)
                pull_all(*pending, evaluated)  # never save a state whose step diverged
                pending = None
                meta = run.save(saved_state, lineage)
                last["saved"] = step
            if on_probe_step is not None and _probe_step(step, save, cfg.train.probe_every):
                probed = saved_state if save else jax.tree.unflatten(treedef, leaves)
                on_probe_step(step, probed, meta if save else run.meta(step, lineage))
        if pending is not None:
            pull_all(*pending)
    finally:
        progress.close()
    return last
