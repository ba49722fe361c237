"""The project's error for bad input: one class every layer can raise and the entry points catch.

``UserError`` means "the input is wrong and the user can fix it" (a config value, a path, a flag,
a workdir of another run). The entry points print its message as one line, ``error: <message>``,
and exit with status 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input, with a message that says what is wrong and how to fix it (one line)."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'steps'?"`` for the closest of ``choices`` to ``name``, or ``""``."""
    close = difflib.get_close_matches(name, [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
