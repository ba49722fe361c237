"""The frozen reference model of a fine-tuning stage: the checkpoint the stage started from.

DPO's implicit reward and GRPO's KL penalty compare the policy with it. The stage's loss spec
names it (``train.loss.reference_workdir`` / ``reference_step``); :func:`resolve_reference` fills
those in from the stage's own lineage (the parent recorded in its checkpoints) or, before the
first checkpoint, from ``init_from`` — so a resumed stage keeps the reference it started with.
A loss loads the parameters (:func:`load_reference_params`) and runs the policy's graph with them
(:func:`reference_model`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
from flax import nnx

from entropy_jax.checkpoint import Checkpoints, read_meta, saved_steps
from entropy_jax.errors import UserError
from entropy_jax.models import ModelConfig, abstract_model
from entropy_jax.sharding import make_mesh


def init_checkpoint(cfg: ml_collections.ConfigDict, workdir: str | Path) -> tuple[str, int] | None:
    """(parent workdir, step) this stage starts (or started) from; None for a run from scratch.

    A workdir with checkpoints answers from its own lineage metadata; otherwise ``init_from``,
    with step -1 resolved to the parent's latest checkpoint. Raises UserError for an
    ``init_from.workdir`` without checkpoints.
    """
    own = saved_steps(workdir)
    if own:
        parent = read_meta(workdir, own[-1]).get("parent")
        return None if parent is None else (parent["workdir"], int(parent["step"]))
    parent_dir = cfg.init_from.workdir
    if not parent_dir:
        return None
    steps = saved_steps(parent_dir)
    if not steps:
        raise UserError(f"init_from.workdir={parent_dir} holds no checkpoints: give a trained run's folder")
    step = steps[-1] if cfg.init_from.step < 0 else int(cfg.init_from.step)
    return str(Path(parent_dir).absolute()), step


def resolve_reference(cfg: ml_collections.ConfigDict, workdir: str | Path) -> None:
    """Point an empty ``train.loss.reference_workdir`` at the stage's init checkpoint (in place)."""
    loss = cfg.train.loss
    if "reference_workdir" not in loss or loss.reference_workdir:
        return
    init = init_checkpoint(cfg, workdir)
    if init is not None:
        loss.reference_workdir, loss.reference_step = init


def load_reference(workdir: str | Path, step: int) -> nnx.State:
    """Parameters of checkpoint ``step`` of ``workdir`` (``step`` -1: the latest), replicated over all devices."""
    steps = saved_steps(workdir)
    if not steps:
        raise UserError(f"the reference workdir {workdir} holds no checkpoints")
    step = steps[-1] if step < 0 else step
    if step not in steps:
        raise UserError(f"reference step {step} is not a checkpoint of {workdir}; saved steps: {steps}")
    meta = read_meta(workdir, step)
    _, params_target, _ = abstract_model(ModelConfig.from_dict(meta["model_config"]), make_mesh())
    with Checkpoints(workdir, read_only=True) as ckpts:
        return ckpts.restore(step, arrays={"params": params_target})["params"]


def load_reference_params(loss_name: str, workdir: str, step: int) -> nnx.State:
    """:func:`load_reference` for loss ``loss_name``; an empty ``workdir`` is refused in one line (ValueError)."""
    if not workdir:
        raise ValueError(f"train.loss.name={loss_name!r} needs a frozen reference model: start the stage from a "
                         "checkpoint (--init_from=<workdir>, which becomes the reference) or set "
                         "train.loss.reference_workdir")
    return load_reference(workdir, step)


def reference_model(model: nnx.Module, ref_params: nnx.State) -> nnx.Module:
    """The policy's graph and non-parameter state with the frozen reference parameters (no gradient)."""
    graphdef, _, model_state = nnx.split(model, nnx.Param, ...)
    return nnx.merge(graphdef, jax.lax.stop_gradient(ref_params), model_state, copy=True)


def prepare_stage(cfg: ml_collections.ConfigDict, workdir: str | Path) -> tuple[str, int]:
    """Before a fine-tuning stage trains: refuse one with no checkpoint to start from, and point its
    loss's reference at the init checkpoint. Returns that checkpoint (parent workdir, step)."""
    init = init_checkpoint(cfg, workdir)
    if init is None:
        raise UserError(f"stage {cfg.stage!r} fine-tunes a checkpoint: give --init_from=<a trained run's folder>")
    resolve_reference(cfg, workdir)
    return init
