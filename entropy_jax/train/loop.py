"""The training loop: data -> sharded jitted step -> metrics.jsonl and log-spaced Orbax checkpoints.

``train(config, workdir)`` is idempotent given the workdir: it resumes from the latest
checkpoint (parameters, optimiser, step and data-iterator position), so a run killed at any
point and started again with the same command produces exactly the uninterrupted result.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
from flax import nnx
from tqdm import tqdm

from entropy_jax import data
from entropy_jax.checkpoint import Checkpoints, ConfigMismatchError, abstract_like, config_differences, is_save_step
from entropy_jax.models import ModelConfig, Transformer
from entropy_jax.sharding import make_mesh, replicated, shard_batch
from entropy_jax.train.metric_writer import MetricWriter, read_metrics
from entropy_jax.train.optim import make_optimizer, make_schedule
from entropy_jax.train.step import TrainState, init_model, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainResult:
    workdir: Path
    final_step: int
    final_loss: float | None
    entropy_rate: float | None
    checkpoint_steps: list[int]
    resumed_from: int | None


def model_config(cfg: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
    """The frozen model config: ``cfg.model`` plus what the data decides (vocabulary, length)."""
    return ModelConfig.from_dict({**cfg.model.to_dict(), "vocab_size": vocab_size, "max_len": cfg.train.seq_len})


def abstract_model(mcfg: ModelConfig, mesh: jax.sharding.Mesh) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's static graph and its parameter shapes (not allocated), replicated over ``mesh``:
    what ``nnx.merge`` and a checkpoint restore need."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(mcfg, rngs=nnx.Rngs(0))), nnx.Param)
    return graphdef, abstract_like(params, replicated(mesh))


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


def _meta(cfg, mcfg: ModelConfig, corpus, step: int, parent: Any) -> dict:
    return {
        "step": step,
        "tokens_seen": step * cfg.train.batch_size * cfg.train.seq_len,
        "stage": cfg.stage,
        "parent": parent,
        "config": cfg.to_dict(),
        "model_config": dataclasses.asdict(mcfg),
        "corpus": corpus.info,
        "entropy_rate": corpus.entropy_rate,
    }


def _restore_or_init(cfg, mcfg, ckpts: Checkpoints, mesh, tx, iterator, target) -> tuple[TrainState, int | None]:
    start = ckpts.latest_step()
    if start is None:
        _, params = init_model(mcfg, cfg.seed)
        state = init_state(params, tx)
        return jax.device_put(state, replicated(mesh)), None
    saved = ckpts.read_meta(start)
    diffs = config_differences(saved["config"], cfg.to_dict())
    if diffs:
        raise ConfigMismatchError(
            f"{ckpts.directory} holds checkpoints (latest step {start}) of a different config: "
            + "; ".join(diffs)
            + ". Use a new --workdir, or rerun with the saved config to resume."
        )
    opt_target = abstract_like(jax.eval_shape(tx.init, target), replicated(mesh))
    params, opt_state, data_state, _ = ckpts.restore_all(start, target, opt_target)
    iterator.set_state(data_state)
    logging.info("resumed from step %d in %s", start, ckpts.directory)
    step = jax.device_put(jax.numpy.asarray(start, jax.numpy.int32), replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state), start


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> TrainResult:
    workdir = Path(workdir)
    corpus = data.load_corpus(cfg.data, cfg.train.seq_len)
    mcfg = model_config(cfg, corpus.vocab_size)
    mesh = make_mesh()
    tx, schedule = make_optimizer(cfg.train), make_schedule(cfg.train)
    graphdef, target = abstract_model(mcfg, mesh)
    iterator = data.make_train_iterator(corpus, cfg.train.batch_size, cfg.seed)
    ckpts = Checkpoints(workdir, cfg.checkpoint.max_to_keep)
    try:
        state, resumed_from = _restore_or_init(cfg, mcfg, ckpts, mesh, tx, iterator, target)
        start = resumed_from or 0
        if resumed_from is None:
            ckpts.save(0, state.params, state.opt_state, iterator.get_state(), _meta(cfg, mcfg, corpus, 0, None))
        writer = MetricWriter(workdir, resume_step=start, tensorboard=cfg.train.tensorboard)
        try:
            last_loss = _run(cfg, mcfg, corpus, state, iterator, make_train_step(graphdef, tx, schedule),
                             mesh, ckpts, writer, start)
        finally:
            writer.close()
    finally:
        ckpts.close()
    if last_loss is None and (workdir / "metrics.jsonl").exists():  # nothing left to train: report the log
        rows = read_metrics(workdir)
        last_loss = rows[-1]["loss"] if rows else None
    return TrainResult(workdir.absolute(), cfg.train.steps, last_loss, corpus.entropy_rate,
                       ckpts.all_steps(), resumed_from)


def _run(cfg, mcfg, corpus, state, iterator, train_step, mesh, ckpts, writer, start) -> float | None:
    """Steps ``start+1 .. train.steps``. Step t is dispatched before step t-1's metrics are pulled."""
    total, ck = cfg.train.steps, cfg.checkpoint
    progress, pending, last = _Progress(start, total), None, {"loss": None, "saved": start}
    window = collections.deque([(start, time.perf_counter())], maxlen=21)  # rate over the last 20 steps

    def pull(step: int, metrics: dict) -> None:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
            raise FloatingPointError(
                f"training diverged at step {step}: loss={m['loss']}, grad_norm={m['grad_norm']}. The last "
                f"good checkpoint is step {last['saved']} in {ckpts.directory}; lower train.lr or raise "
                "train.warmup_steps, and use a new --workdir (or delete the later steps) to retry."
            )
        gap = None if corpus.entropy_rate is None else m["loss"] - corpus.entropy_rate
        window.append((step, time.perf_counter()))
        if step % cfg.train.log_every == 0 or step == total:
            rate = (step - window[0][0]) / max(window[-1][1] - window[0][1], 1e-9)
            tokens = cfg.train.batch_size * cfg.train.seq_len
            writer.write(step, {**m, "loss_minus_entropy_rate": gap, "tokens_seen": step * tokens,
                                "steps_per_sec": rate, "tokens_per_sec": rate * tokens})
        progress.update(step, m["loss"], gap)
        last["loss"] = m["loss"]

    try:
        for step in range(start + 1, total + 1):
            batch = shard_batch(next(iterator), mesh)
            state, metrics = train_step(state, batch)
            if pending is not None:
                pull(*pending)
            pending = (step, metrics)
            if is_save_step(step, total, ck.dense_until, ck.every):
                pull(*pending)  # never save a state whose step diverged
                pending = None
                ckpts.save(step, state.params, state.opt_state, iterator.get_state(),
                           _meta(cfg, mcfg, corpus, step, None))
                last["saved"] = step
        if pending is not None:
            pull(*pending)
    finally:
        progress.close()
    return last["loss"]
