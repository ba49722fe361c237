"""Force several CPU devices before jax is imported, so sharding is tested for real."""

import os

NUM_TEST_DEVICES = 4
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={NUM_TEST_DEVICES}"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, shared with the subprocesses the tests start
# (command-line runs, SIGKILL-and-resume, several processes): a program compiled once is loaded,
# not recompiled, by the next process or the next jit of the same computation.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="entropy_jax_tests_jit_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest  # noqa: E402  (after the XLA flags on purpose)

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most 4 (each worker holds a few GB: its own 4-device
    XLA client, the session's trained run and the subprocesses its tests start)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def make_test_config(data_dir, **overrides):
    """The ``test`` preset with its corpus under ``data_dir``; ``overrides`` are dotted keys."""
    from experiments.configs.pretrain import get_config

    cfg = get_config("test")
    cfg.data.data_dir = str(data_dir)
    cfg.data.download = False
    for key, value in overrides.items():
        node, *path = key.split(".")
        target = cfg
        for part in [node, *path][:-1]:
            target = target[part]
        target[[node, *path][-1]] = value
    return cfg


def load_module(relative_path):
    """The Python file at ``REPO / relative_path`` as a module (the benchmarks are scripts, not a package)."""
    import importlib.util

    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def restore_params(cfg, workdir, step):
    """The parameters of ``workdir``'s checkpoint ``step`` (model from ``cfg``) as host numpy arrays."""
    import jax
    from flax import nnx

    from entropy_jax.checkpoint import Checkpoints
    from entropy_jax.models import abstract_model, model_config
    from entropy_jax.sharding import make_mesh

    _, params, _ = abstract_model(model_config(cfg.model, cfg.data.vocab_size, cfg.train.seq_len), make_mesh())
    ckpts = Checkpoints(workdir, read_only=True)
    try:
        return jax.device_get(nnx.to_pure_dict(ckpts.restore(step, arrays={"params": params})["params"]))
    finally:
        ckpts.close()


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA without most optimisations for a module's tests, where compilation dominates the tiny
    models' run time (as in flax's lm1b test); the default again after the module."""
    import jax

    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", False)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, data_dir):
    """One trained run of the test preset (8 checkpoints), shared read-only by the tests."""
    import jax

    from entropy_jax import train

    workdir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = make_test_config(data_dir)
    # Always the default compiler: the run is compared bit for bit with runs other tests make
    # (in subprocesses, or after a ``fast_compiles`` module), whichever module first asks for it.
    fast = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        result = train.train(cfg, workdir)
    finally:
        jax.config.update("jax_disable_most_optimizations", fast)
    return cfg, workdir, result


def execute_notebook(workdir, monkeypatch, name: str = "phase_trajectories.ipynb", env: dict | None = None,
                     timeout: int = 120) -> None:
    """Run notebooks/``name`` top to bottom against ``workdir`` (and ``env``); fail on any error cell."""
    import os

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    kernelspec = pytest.importorskip("jupyter_client.kernelspec")
    if "python3" not in kernelspec.find_kernel_specs():
        pytest.skip("no python3 jupyter kernel available")
    monkeypatch.setenv("ENTROPY_JAX_WORKDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, str(value))
    path = REPO / "notebooks" / name
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    nbclient.NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]


def kill_when_exists(proc, path, timeout: float = 300.0) -> None:
    """SIGKILL ``proc`` (not a clean exit) as soon as ``path`` appears; fail if it ends first."""
    import signal
    import time

    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
