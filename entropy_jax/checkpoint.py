"""Orbax checkpoints: log-spaced steps, exact resume, and params-only restore for probes.

Layout: ``workdir/checkpoints/<step>/{params,opt_state,data,meta}``. ``meta`` is JSON holding
the config, the model config, step, tokens seen, stage and parent checkpoint, so a probe
needs nothing but the workdir. Saves are asynchronous; Orbax commits a step by renaming a
temporary folder, so a step listed by ``all_steps()`` is complete unless a file was damaged
afterwards (restores then raise ``CheckpointReadError``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

# Keys of the saved config that must match to resume into the same workdir.
RESUME_KEYS = ("seed", "data", "model", "train.batch_size", "train.seq_len")


class ConfigMismatchError(ValueError):
    """The workdir holds checkpoints made with an incompatible config."""


class CheckpointReadError(RuntimeError):
    """A checkpoint step exists but cannot be read (half-written or damaged)."""


def is_save_step(step: int, total_steps: int, dense_until: int = 512, every: int = 1000) -> bool:
    """Log-spaced schedule: step 0, every power of two up to ``dense_until``, every ``every``
    steps after that, and the last step. Dense early because geometry changes fast early."""
    if step in (0, total_steps):
        return True
    if step <= dense_until and step & (step - 1) == 0:
        return True
    return every > 0 and step % every == 0


def _lookup(cfg: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = cfg.get(part, {}) if isinstance(cfg, dict) else {}
    return cfg


def config_differences(saved: dict, current: dict) -> list[str]:
    """Human-readable differences in the keys that must match for a resume."""
    diffs = []
    for key in RESUME_KEYS:
        a, b = _lookup(saved, key), _lookup(current, key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [f"{key}.{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
                      if a.get(k) != b.get(k)]
        elif a != b:
            diffs.append(f"{key}: {a!r} -> {b!r}")
    return diffs


class Checkpoints:
    """A thin wrapper over one ``ocp.CheckpointManager`` at ``workdir/checkpoints``."""

    def __init__(self, workdir: str | Path, max_to_keep: int = 0, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep or None, create=not read_only, read_only=read_only
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_state: dict, meta: dict) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta),
            ),
        )

    def _restore(self, step: int, **items: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for damaged files
            raise CheckpointReadError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {e}); "
                "it is probably half-written or damaged: delete that step's folder to fall back to "
                "the previous one"
            ) from e

    def read_meta(self, step: int) -> dict:
        return self._restore(step, meta=ocp.args.JsonRestore()).meta

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Parameters only (what a probe needs), placed as ``abstract_params``' shardings say."""
        return self._restore(step, params=ocp.args.StandardRestore(abstract_params)).params

    def restore_all(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple:
        r = self._restore(
            step,
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        return r.params, r.opt_state, r.data, r.meta

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Shape/dtype skeleton of ``tree`` with every leaf placed by ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
