"""The package's imports point down the flow of data, never back up, and form no cycle."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "entropy_jax"
# Lowest first; a module may import its own layer or any lower one.
LAYERS = (
    {"errors", "sharding", "workdir", "data", "models", "config"},
    {"train", "checkpoint"},
    {"probes"},
    {"sweep"},
    {"analysis"},
    {"validate", "cli"},
)
LAYER_OF = {unit: i for i, units in enumerate(LAYERS) for unit in units}


def _unit(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "entropy_jax" and len(parts) > 1 else None


def _imports(path: Path) -> set[str]:
    """``entropy_jax.<unit>`` targets imported anywhere in a file (module level or not)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {u for u in map(_unit, names) if u and ((PACKAGE / u).is_dir() or (PACKAGE / f"{u}.py").exists())}
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        unit = rel[0].removesuffix(".py")
        if unit == "__init__":
            continue
        graph.setdefault(unit, set()).update(_imports(path) - {unit})
    return graph


def test_every_unit_has_a_layer():
    assert set(_graph()) <= set(LAYER_OF), set(_graph()) - set(LAYER_OF)


def test_imports_point_down_the_layers():
    upward = [f"{a} (layer {LAYER_OF[a]}) imports {b} (layer {LAYER_OF[b]})"
              for a, targets in _graph().items() for b in targets if LAYER_OF[b] > LAYER_OF[a]]
    assert not upward, upward


def test_no_import_cycle_between_units():
    graph, state = _graph(), {}

    def visit(node, trail):
        if state.get(node) == "done":
            return
        assert state.get(node) != "open", " -> ".join([*trail, node])
        state[node] = "open"
        for nxt in graph.get(node, ()):
            visit(nxt, [*trail, node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_the_layer_test_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a probe module importing the sweep is reported."""
    fake = tmp_path / "entropy_jax"
    (fake / "probes").mkdir(parents=True)
    (fake / "sweep").mkdir()
    (fake / "probes" / "bad.py").write_text("from entropy_jax.sweep import sweep\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["probes"] == {"sweep"} and LAYER_OF["sweep"] > LAYER_OF["probes"]


def test_probes_import_without_the_training_or_data_stack():
    code = "import sys, entropy_jax.probes; print('\\n'.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    forbidden = {f"entropy_jax.{u}" for u in ("train", "data", "analysis", "checkpoint", "sweep")}
    forbidden |= {"orbax", "orbax.checkpoint", "grain", "tensorflow_datasets"}
    assert not loaded & forbidden, loaded & forbidden
    assert "entropy_jax.probes.spectra" in loaded


def test_the_training_path_does_not_import_matplotlib():
    """What experiments/pretrain.py and posttrain.py import (config checks, training, the in-training
    probes) leaves the plotting stack out: every training run would otherwise pay for it."""
    code = ("import sys, entropy_jax.cli, entropy_jax.train, entropy_jax.sweep, entropy_jax.validate; "
            "print('\\n'.join(sorted(sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.split())
    assert "entropy_jax.train.loop" in loaded and "entropy_jax.validate" in loaded
    assert not {m for m in loaded if m == "matplotlib" or m.startswith(("matplotlib.", "entropy_jax.analysis"))}
