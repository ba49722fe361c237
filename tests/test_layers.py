"""The package's imports point down the flow of data, never back up, and form no cycle: neither
between units nor among the modules of one unit (an import inside a function counts too, so a
lazy import cannot hide a cycle)."""

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


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as the path around it (first node repeated at the end), or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        if state.get(node) == "open":
            return [*trail[trail.index(node):], node]
        if state.get(node) == "done":
            return None
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if found := visit(nxt, [*trail, node]):
                return found
        state[node] = "done"
        return None

    return next((c for node in sorted(graph) if (c := visit(node, []))), None)


def test_no_import_cycle_between_units():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def _module_name(path: Path) -> str:
    """``entropy_jax.train.losses`` for ``PACKAGE/train/losses.py``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(["entropy_jax", *parts[:-1]] + ([] if parts[-1] == "__init__" else [parts[-1]]))


def _module_graph() -> dict[str, set[str]]:
    """Module -> the modules of its own unit it imports, anywhere in the file.

    ``from a.b import c`` is an edge to the module ``a.b.c`` when there is one, else to ``a.b``
    (a package's ``__init__``). Importing ``a.b.c`` runs ``a.b`` first, but that is no edge: the
    package is already being imported whenever one of its modules is.
    """
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in paths.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                            for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
        graph[module] = {t for t in targets & set(paths) if _unit(t) == _unit(module) and t != module}
    return graph


def test_no_import_cycle_inside_a_unit():
    cycle = _cycle(_module_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_layer_test_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a probe module importing the sweep is reported."""
    fake = tmp_path / "entropy_jax"
    (fake / "probes").mkdir(parents=True)
    (fake / "sweep").mkdir()
    (fake / "probes" / "bad.py").write_text("from entropy_jax.sweep import sweep\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    graph = _graph()
    assert graph["probes"] == {"sweep"} and LAYER_OF["sweep"] > LAYER_OF["probes"]


def test_the_cycle_test_sees_a_circle_inside_a_unit(tmp_path, monkeypatch):
    """The checker itself: two modules of one unit importing each other, one of them lazily, are reported."""
    fake = tmp_path / "entropy_jax" / "train"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from entropy_jax.train import a\n")
    (fake / "a.py").write_text("from entropy_jax.train.b import helper\n")
    (fake / "b.py").write_text("def helper():\n    from entropy_jax.train import a\n    return a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "entropy_jax")
    graph = _module_graph()
    assert graph == {"entropy_jax.train": {"entropy_jax.train.a"}, "entropy_jax.train.a": {"entropy_jax.train.b"},
                     "entropy_jax.train.b": {"entropy_jax.train.a"}}
    assert _cycle(graph) == ["entropy_jax.train.a", "entropy_jax.train.b", "entropy_jax.train.a"]


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
