"""The repository stands alone: no tracked file points to a ``shared`` folder beside the checkout."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = re.compile(r"\.\./shared|shared/(METRICS|SCIENCE|DESIGN|STYLE|reference)")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        pytest.skip(f"not a git checkout ({e})")
    return [ROOT / name for name in out.decode().split("\0") if name]


def test_no_tracked_file_points_outside_the_repository() -> None:
    this = Path(__file__).resolve()
    hits = []
    for path in _tracked_files():
        if path.resolve() == this or not path.is_file():
            continue
        text = path.read_bytes().decode("utf-8", errors="ignore")
        hits += [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)}"
                 for m in OUTSIDE.finditer(text)]
    assert not hits, "files point to the shared folder beside the checkout, which users lack:\n" + "\n".join(hits)


def test_pattern_catches_pointers() -> None:
    # Built by concatenation so that this file does not itself match a grep for such pointers.
    assert OUTSIDE.search("see ../" + "shared/" + "SCIENCE.md")
    assert OUTSIDE.search("definitions in ``shared/" + "METRICS.md``")
    assert not OUTSIDE.search("a 2-core VM shared with other jobs; one shared tridiagonalisation")
