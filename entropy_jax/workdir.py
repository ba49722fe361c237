"""The layout of a run directory: the one place that spells its paths.

```
<workdir>/
  run_id                      a stable id written once (lineage metadata and the results table use it)
  .lock, .lock.holder         while a writer runs: its lock (flock target) and who it is (pid, host, start time)
  checkpoints/<step>/...      Orbax checkpoints (entropy_jax.checkpoint)
  metrics.jsonl               one JSON object per logged training step
  tensorboard/                the same scalars as TensorBoard events (train.tensorboard)
  probes/probe_set.npz        the fixed probe sequences and their sha256
  probes/results.parquet      the tidy results table (results.csv where pyarrow is absent)
  probes/spectra/step_<step:08d>.npz
  probes/phases.csv           phase boundaries
  probes/stages.csv           per-stage summary of a lineage (in its last stage's workdir)
  probes/tokenizer.json       imported models: the tokenizer of the text probe set
  probes/weights_from_files.csv  imported models: weight statistics read from the files
  plots/*.png
```

One writer per workdir: training, the probe sweep and plotting each hold :meth:`Workdir.lock`
while they write. Every file is written through a unique temporary name and an atomic rename
(:func:`atomic_path`), so a reader, or a process killed mid-write, never sees half a file;
``metrics.jsonl``, the one file appended to, is read tolerating a torn last line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from entropy_jax.errors import UserError


class WorkdirBusyError(UserError):
    """Another process holds the workdir's lock."""


# Workdirs whose lock this process holds: root -> [fd, depth]. The training process that runs
# in-training probes takes the lock once for both (a second flock on a new descriptor of the
# same file would refuse its own holder).
_HELD: dict[Path, list[int]] = {}


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths of one run directory (nothing is created until a writer asks)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root).absolute())

    def __fspath__(self) -> str:
        """A Workdir is path-like (its root), so it goes wherever a folder path is accepted."""
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @classmethod
    def from_flag(cls, value: str | os.PathLike | None, flag: str = "--workdir") -> Workdir:
        """The workdir a command-line flag names: refused when empty (it would be the current
        folder) or a file; ``~`` is expanded."""
        if value is None or not str(value).strip():
            raise UserError(f"{flag} is empty: name the run's folder, e.g. {flag}=runs/demo")
        path = Path(value).expanduser().absolute()
        if path.exists() and not path.is_dir():
            raise UserError(f"{flag}={value} is a file, not a folder: name a folder (new or a run's)")
        return cls(path)

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        """TensorBoard event files (``train.tensorboard``)."""
        return self.root / "tensorboard"

    @property
    def probes(self) -> Path:
        return self.root / "probes"

    @property
    def probe_set(self) -> Path:
        return self.probes / "probe_set.npz"

    @property
    def results(self) -> Path:
        """The results table: Parquet, unless only a CSV one exists."""
        parquet, csv = self.probes / "results.parquet", self.results_csv
        return csv if csv.exists() and not parquet.exists() else parquet

    @property
    def results_csv(self) -> Path:
        """The results table where pyarrow is absent."""
        return self.probes / "results.csv"

    @property
    def spectra(self) -> Path:
        return self.probes / "spectra"

    def spectra_file(self, step: int) -> Path:
        return self.spectra / f"step_{step:08d}.npz"

    @property
    def phases(self) -> Path:
        return self.probes / "phases.csv"

    @property
    def stages(self) -> Path:
        """The lineage's stage summary (written in the last stage's workdir)."""
        return self.probes / "stages.csv"

    @property
    def tokenizer(self) -> Path:
        """An imported model's ``tokenizer.json``, kept for its text probe set."""
        return self.probes / "tokenizer.json"

    @property
    def weights_from_files(self) -> Path:
        """Weight statistics of imported revisions read straight from their files."""
        return self.probes / "weights_from_files.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def run_id_file(self) -> Path:
        return self.root / "run_id"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    @property
    def lock_holder_file(self) -> Path:
        return self.root / ".lock.holder"

    @contextlib.contextmanager
    def lock(self, purpose: str, enabled: bool = True, create: bool = True) -> Iterator[None]:
        """Hold the workdir's exclusive lock while writing; refuse at once if another process holds it.

        An advisory ``fcntl.flock`` on ``.lock``: the OS releases it when the holder exits or is
        killed, so no stale lock survives a crash. Who holds it (pid, host, start time, purpose) is
        written to ``.lock.holder`` for the refusal message. Both files are deleted on release, so a
        refused or finished writer leaves the workdir as it found it. Re-entrant within a process.
        ``enabled=False`` (processes other than 0 of a multi-process run, which write nothing) makes
        it a no-op; ``create=False`` refuses a workdir that does not exist instead of making it.

        Raises:
          WorkdirBusyError: another process holds the lock (the message names it and what to do).
          FileNotFoundError: the workdir does not exist and ``create`` is False.
        """
        if not enabled:
            yield
            return
        if self.root in _HELD:
            _HELD[self.root][1] += 1
            try:
                yield
            finally:
                _HELD[self.root][1] -= 1
            return
        fd = self._acquire(purpose, create)
        _HELD[self.root] = [fd, 1]
        try:
            yield
        finally:
            del _HELD[self.root]
            # Deleted while still locked, so never the next holder's files; a process that opened
            # this .lock before the deletion sees it is gone once it locks, and retries (_acquire).
            self.lock_holder_file.unlink(missing_ok=True)
            self.lock_file.unlink(missing_ok=True)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _acquire(self, purpose: str, create: bool) -> int:
        if not self.root.is_dir():
            if not create:
                raise FileNotFoundError(f"workdir {self.root} does not exist")
            self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise WorkdirBusyError(self._busy_message(purpose)) from None
            try:
                if os.fstat(fd).st_ino == os.stat(self.lock_file).st_ino:
                    break  # the file we locked is still the workdir's lock file
            except FileNotFoundError:
                pass
            os.close(fd)  # its previous holder deleted it after we opened it: lock the new one
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                  "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
        write_text_atomic(self.lock_holder_file, json.dumps(holder) + "\n")
        return fd

    def _busy_message(self, purpose: str) -> str:
        try:
            h = json.loads(self.lock_holder_file.read_text())
            who = f"pid {h['pid']} on host {h['host']} ({h['purpose']} since {h['since']})"
            stop = f"stop it (kill -INT {h['pid']} on {h['host']})"
        except (OSError, ValueError, KeyError):  # the holder is between locking and writing its name
            who, stop = "another process", "stop it"
        return (f"workdir {self.root} is in use by {who}, so {purpose} was refused: wait for it to finish "
                f"or {stop}, then rerun; or use another --workdir")

    def run_id(self, create: bool = False) -> str:
        """The run's stable id: read from ``run_id``; with ``create``, written once if absent.

        A workdir without one (written before run ids existed, or read-only) is named by its folder.
        """
        if self.run_id_file.exists():
            return self.run_id_file.read_text().strip()
        if not create:
            return self.name
        run_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        write_text_atomic(self.run_id_file, run_id + "\n")
        return run_id


def check_writable(path: Path, what: str) -> None:
    """``path`` (or, if it does not exist yet, its nearest existing parent) must accept new files."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK if existing.is_dir() else os.W_OK):
        raise UserError(f"{existing} is read-only, but {what} writes there: make it writable or use another "
                        "--workdir")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A unique temporary path beside ``path`` to write to; renamed onto ``path`` when the block
    succeeds, deleted when it fails. Readers see the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file and an atomic rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file; a torn (half-written) last line is ignored, any other bad line raises."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:  # a write interrupted mid-line: the row was never complete
                break
            raise UserError(f"{path}, line {i + 1}, is not valid JSON ({e}); fix or delete that line") from e
    return rows
