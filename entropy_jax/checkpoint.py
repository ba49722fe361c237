"""Orbax checkpoints: log-spaced steps, exact resume, and params-only restore for probes.

Layout: ``workdir/checkpoints/<step>/{params,model_state,opt_state,rng,data,meta}``. ``meta`` is
JSON holding the config, the model config, step, tokens seen (cumulative along a lineage),
stage, run id and parent checkpoint, so a probe needs nothing but the workdir. Saves are
asynchronous; Orbax commits a step by renaming a temporary folder, so a step listed by
``all_steps()`` is complete unless a file was damaged afterwards (restores then raise
``CheckpointReadError``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
    """A thin wrapper over one ``ocp.CheckpointManager`` at ``workdir/checkpoints``.

    A checkpoint holds named items: array pytrees (``params``, ``model_state``, ``opt_state``,
    ``rng``, ...) saved with ``StandardSave`` and JSON dicts (``data``: the iterator state,
    ``meta``) saved with ``JsonSave``. A new item is one more entry in those dicts. Empty pytrees
    (a model without non-parameter state) are not written and restore as themselves.
    """

    def __init__(self, workdir: str | Path, max_to_keep: int = 0, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        # The folder is made at the first save, so a run refused before it (a bad config, a
        # mismatched parent) leaves nothing behind.
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=False, read_only=read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: Mapping[str, Any], json: Mapping[str, dict]) -> None:
        items = {k: ocp.args.StandardSave(v) for k, v in arrays.items() if jax.tree.leaves(v)}
        items |= {k: ocp.args.JsonSave(v) for k, v in json.items()}
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, arrays: Mapping[str, Any] = (), json: Iterable[str] = ()) -> dict[str, Any]:
        """Items of checkpoint ``step``: each array item placed as its abstract target says, each JSON
        item as a dict. Raises CheckpointReadError for a damaged or half-written step."""
        arrays = dict(arrays)
        empty = {k: v for k, v in arrays.items() if not jax.tree.leaves(v)}
        items = {k: ocp.args.StandardRestore(v) for k, v in arrays.items() if k not in empty}
        items |= {k: ocp.args.JsonRestore() for k in json}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for damaged files
            raise CheckpointReadError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {e}); "
                "it is probably half-written or damaged: delete that step's folder to fall back to "
                "the previous one"
            ) from e
        return {**empty, **{k: restored[k] for k in items}}

    def items(self, step: int) -> set[str]:
        """Names of the items stored for ``step``."""
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def read_meta(self, step: int) -> dict:
        return self.restore(step, json=["meta"])["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
