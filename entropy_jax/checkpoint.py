"""Orbax checkpoints: log-spaced steps, exact resume, and params-only restore for probes.

Layout: ``workdir/checkpoints/<step>/{params,model_state,opt_state,rng,data,meta,checksums}``.
``meta`` is JSON holding the config, the model config, the corpus and its fingerprint, step,
tokens seen (cumulative along a lineage), stage, run id and parent checkpoint, so a probe needs
nothing but the workdir. ``checksums`` holds the sha256 of every saved array item
(:func:`content_hash`), verified on restore. Saves are asynchronous; Orbax commits a step by
renaming a temporary folder, so a step listed by ``all_steps()`` is complete unless a file was
damaged afterwards (restores then raise ``CheckpointReadError``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json as jsonlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from entropy_jax.errors import UserError
from entropy_jax.workdir import Workdir


class ConfigMismatchError(UserError, ValueError):
    """The workdir holds checkpoints made with an incompatible config."""


class CheckpointReadError(UserError, RuntimeError):
    """A checkpoint step exists but cannot be read (half-written or damaged)."""


def is_save_step(step: int, total_steps: int, dense_until: int = 512, every: int = 1000) -> bool:
    """Log-spaced schedule: step 0, every power of two up to ``dense_until``, every ``every``
    steps after that, and the last step. Dense early because geometry changes fast early."""
    if step in (0, total_steps):
        return True
    if step <= dense_until and step & (step - 1) == 0:
        return True
    return every > 0 and step % every == 0


def content_hash(tree: Any) -> str:
    """sha256 (hex) of a pytree's leaf bytes, leaves in tree order: identifies saved content.

    The leaves are fetched to the host (parameters are replicated; a sharded layout would need
    a gather first). The results table keeps the first 16 hex digits as ``ckpt_hash``.
    """
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(tree)):
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


# Corpus info that names where the files are, not what they hold (moving them is no change).
_CORPUS_LOCATION_KEYS = ("data_dir", "path")


def corpus_fingerprint(info: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies a corpus's content: its info (builder, builder config, version, split sizes,
    entropy metadata) without its location, plus ``sha256`` of that as canonical JSON. A text
    folder's builder config is named by a hash of its files' names and bytes, so an edited file
    changes the fingerprint."""
    content = {k: v for k, v in info.items() if k not in _CORPUS_LOCATION_KEYS}
    digest = hashlib.sha256(jsonlib.dumps(content, sort_keys=True, default=str).encode()).hexdigest()
    return {**content, "sha256": digest}


def corpus_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`corpus_fingerprint` dicts (empty if equal)."""
    if saved.get("sha256") == current.get("sha256"):
        return []
    keys = sorted((set(saved) | set(current)) - {"sha256"})
    return [f"corpus.{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


@dataclasses.dataclass
class _Retention(ocp.checkpoint_managers.PreservationPolicy):
    """Keep the latest ``max_to_keep`` checkpoints and every step in ``protected``."""

    max_to_keep: int
    protected: set[int] = dataclasses.field(default_factory=set)

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> Sequence[bool]:
        n = len(checkpoints)
        return [i >= n - self.max_to_keep or c.step in self.protected for i, c in enumerate(checkpoints)]


def _gist(e: BaseException, limit: int = 160) -> str:
    """The readable start of a library error: its first line, without the JSON specs (TensorStore
    quotes kilobytes of them), cut at ``limit`` characters."""
    text = re.sub(r"\{.*\}", "{...}", (str(e).strip().splitlines() or [type(e).__name__])[0])
    return text if len(text) <= limit else text[:limit] + "..."


def saved_steps(workdir: str | Path) -> list[int]:
    """Checkpoint steps in ``workdir`` (read-only; [] when it has none)."""
    if not Workdir(workdir).checkpoints.is_dir():
        return []
    with Checkpoints(workdir, read_only=True) as ckpts:
        return ckpts.all_steps()


def read_meta(workdir: str | Path, step: int) -> dict:
    """The metadata of checkpoint ``step`` of ``workdir`` (read-only)."""
    with Checkpoints(workdir, read_only=True) as ckpts:
        return ckpts.read_meta(step)


class Checkpoints:
    """A thin wrapper over one ``ocp.CheckpointManager`` at ``workdir/checkpoints``.

    A checkpoint holds named items: array pytrees (``params``, ``model_state``, ``opt_state``,
    ``rng``, ...) saved with ``StandardSave`` and JSON dicts (``data``: the iterator state,
    ``meta``) saved with ``JsonSave``, plus ``checksums`` ({item: :func:`content_hash`} of every
    array item). A new item is one more entry in those dicts. Empty pytrees (a model without
    non-parameter state) are not written and restore as themselves.

    ``max_to_keep`` > 0 deletes all but the latest that many after each save, except the steps
    passed to :meth:`protect` (checkpoints an earlier run kept for the probes).

    As a context manager it closes itself (waiting for pending saves) on leaving the block::

        with Checkpoints(workdir, read_only=True) as ckpts:
            meta = ckpts.read_meta(ckpts.latest_step())
    """

    def __init__(self, workdir: str | Path, max_to_keep: int = 0, read_only: bool = False):
        self.directory = Workdir(workdir).checkpoints
        self._retention = _Retention(max_to_keep) if max_to_keep and not read_only else None
        # The folder is made at the first save, so a run refused before it (a bad config, a
        # mismatched parent) leaves nothing behind.
        options = ocp.CheckpointManagerOptions(create=False, read_only=read_only,
                                               preservation_policy=self._retention)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def protect(self, steps: Iterable[int]) -> None:
        """Never delete these steps, whatever ``max_to_keep`` says."""
        if self._retention is not None:
            self._retention.protected.update(steps)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, arrays: Mapping[str, Any], json: Mapping[str, dict]) -> dict[str, str]:
        """Save one checkpoint (asynchronously); returns the checksums saved with it."""
        arrays = {k: v for k, v in arrays.items() if jax.tree.leaves(v)}
        checksums = {k: content_hash(v) for k, v in arrays.items()}
        items = {k: ocp.args.StandardSave(v) for k, v in arrays.items()}
        items |= {k: ocp.args.JsonSave(v) for k, v in {**json, "checksums": checksums}.items()}
        if jax.process_index() == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
        self.manager.save(step, args=ocp.args.Composite(**items))
        return checksums

    def restore(self, step: int, arrays: Mapping[str, Any] = (), json: Iterable[str] = ()) -> dict[str, Any]:
        """Items of checkpoint ``step``: each array item placed as its abstract target says, each JSON
        item as a dict. Array items are verified against the checksums saved with them.

        Raises CheckpointReadError for a damaged, half-written or altered step."""
        arrays, json = dict(arrays), list(json)
        empty = {k: v for k, v in arrays.items() if not jax.tree.leaves(v)}
        items = {k: ocp.args.StandardRestore(v) for k, v in arrays.items() if k not in empty}
        checked = bool(items) and "checksums" not in json and (self.directory / str(step) / "checksums").is_dir()
        items |= {k: ocp.args.JsonRestore() for k in [*json, *(["checksums"] if checked else [])]}
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # Orbax raises many types for damaged files
            raise CheckpointReadError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: {_gist(e)}); "
                "it is probably half-written or damaged: delete that step's folder to fall back to "
                "the previous one"
            ) from e
        if checked:
            self._verify(step, {k: restored[k] for k in arrays if k not in empty}, restored["checksums"])
        return {**empty, **{k: restored[k] for k in items if k != "checksums" or not checked}}

    def _verify(self, step: int, arrays: Mapping[str, Any], saved: Mapping[str, str]) -> None:
        for name, tree in arrays.items():
            if name in saved and (read := content_hash(tree)) != saved[name]:
                raise CheckpointReadError(
                    f"checkpoint step {step} in {self.directory}: its {name} do not match the checksum "
                    f"saved with them (sha256 {saved[name][:12]}... saved, {read[:12]}... read): the files were "
                    "changed or damaged after saving. Delete that step's folder to fall back to the previous one"
                )

    def read_checksums(self, step: int) -> dict[str, str]:
        """The checksums saved with ``step`` ({} for checkpoints written before they were)."""
        if not (self.directory / str(step) / "checksums").is_dir():
            return {}
        return self.restore(step, json=["checksums"])["checksums"]

    def items(self, step: int) -> set[str]:
        """Names of the items stored for ``step``."""
        return {p.name for p in (self.directory / str(step)).iterdir() if p.is_dir()}

    def read_meta(self, step: int) -> dict:
        return self.restore(step, json=["meta"])["meta"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


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
