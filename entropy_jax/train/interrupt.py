"""Stopping training cleanly: SIGINT / SIGTERM set a flag checked between steps, so a signal never
lands inside an Orbax save; :class:`TrainingInterrupted` carries the shell's exit status."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any


class TrainingInterrupted(BaseException):
    """Training stopped on SIGINT or SIGTERM between steps; rerunning the command resumes exactly.

    A BaseException, like KeyboardInterrupt, so no ``except Exception`` swallows it.
    ``exit_code`` is the shell's convention, 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int, step: int, saved: int | None, directory: Path):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        where = f"the latest checkpoint is step {saved}" if saved is not None else "no checkpoint was saved"
        super().__init__(f"training stopped by {signal.Signals(signum).name} after step {step}; {where} in "
                         f"{directory}: rerun the same command to resume exactly")


class StopSignals:
    """SIGINT/SIGTERM set ``signum``, checked between steps; a second signal exits at once.

    Handlers only set a flag, so a signal never lands inside an Orbax save (which can then hang
    on its barrier). Outside the main thread nothing is installed.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> StopSignals:
        self.signum: int | None = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            os.write(2, b"second signal: exiting now (the last complete checkpoint is kept)\n")
            os._exit(128 + signum)
        self.signum = signum
        os.write(2, f"{signal.Signals(signum).name}: stopping after this step (again to exit now)\n".encode())

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
