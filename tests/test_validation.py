"""Bad input is one line, exit status 2 and nothing written: config checks, the resume check, workdirs,
plot requests, disk-full and download errors, and the entry points run as real processes."""

import errno
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import optax
import pandas as pd
import pytest
from conftest import NUM_TEST_DEVICES, REPO, make_test_config

from entropy_jax import cli, validate
from entropy_jax.analysis import check_plot_request
from entropy_jax.config import DataConfig, TrainConfig
from entropy_jax.data import load_corpus
from entropy_jax.data.text import DatasetUnavailableError, download_failure
from entropy_jax.errors import UserError
from entropy_jax.sweep.table import RESULTS_COLUMNS
from entropy_jax.train.metric_writer import read_metrics
from entropy_jax.train.optim import make_optimizer
from entropy_jax.train.start import plan_start, resume_differences
from entropy_jax.workdir import Workdir

CONFIG = str(REPO / "experiments/configs/pretrain.py")


def _snapshot(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.parametrize("overrides, message", [
    ({"train.steps": -5}, r"train\.steps=-5 must be >= 1"),
    ({"train.steps": 0}, r"train\.steps=0 must be >= 1"),
    ({"train.log_every": 0}, r"train\.log_every=0 must be >= 1"),
    ({"model.num_heads": 0}, r"model\.num_heads=0 must be an integer >= 1"),
    ({"model.num_heads": 3}, r"d_model=16 is not divisible by num_heads=3"),
    ({"train.batch_size": 30}, rf"train\.batch_size=30 is not divisible by the {NUM_TEST_DEVICES} devices"),
    ({"probe_set.num_sequences": 1000}, r"num_sequences=1000 is larger than the validation split \(256"),
    ({"train.lr": -1.0}, r"train\.lr=-1\.0 must be a positive number"),
    ({"train.b2": 1.0}, r"train\.b2=1\.0 must be in \[0, 1\)"),
    ({"data.name": "markv"}, r"data\.name='markv' is not a corpus; did you mean 'markov'\?"),
    ({"data.successors": 100}, r"data\.successors=100 must be in 3\.\.data\.vocab_size=64"),
    ({"data.name": "text_folder", "data.text_dir": "/no/such/folder"}, r"/no/such/folder.*is not a directory"),
    ({"train.loss": {"name": "next_tokn"}}, r"next_tokn.*not a known loss"),
    ({"probes.attention": {"type": "atention"}}, r"probes\.attention\.type='atention'.*did you mean 'attention'"),
    ({"init_from.workdir": "/no/such/run"}, r"init_from\.workdir=/no/such/run holds no checkpoints"),
])
def test_check_config_names_the_problem(data_dir, overrides, message):
    with pytest.raises(UserError, match=message) as e:
        validate.check_config(make_test_config(data_dir, **overrides))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("preset", ["tiny", "small", "uniform", "wide", "test"])
def test_every_preset_passes(preset):
    from experiments.configs.pretrain import get_config

    validate.check_config(get_config(preset))


def test_typed_sections_reject_unknown_keys_and_types():
    with pytest.raises(UserError, match=r"unknown config key train\.stepz; did you mean 'steps'\?"):
        TrainConfig.from_dict({"stepz": 3})
    with pytest.raises(UserError, match=r"train\.steps='80' is a str; it must be a int"):
        TrainConfig.from_dict({"steps": "80"})
    assert TrainConfig.from_dict({"lr": 1}).lr == 1.0 and isinstance(TrainConfig.from_dict({"lr": 1}).lr, float)
    assert DataConfig.from_dict({"name": "assoc_pairs", "successors": 1}).successors == 1  # unused by the kind


def test_resume_differences_compare_what_matters(data_dir):
    base = make_test_config(data_dir).to_dict()

    def diff(**overrides):
        return [d.key for d in resume_differences(base, make_test_config(data_dir, **overrides).to_dict())]

    assert diff() == []
    assert diff(**{"data.download": True}) == []  # the switch, not the data
    assert diff(**{"data.data_dir": f"{data_dir}/../{data_dir.name}/."}) == []  # the same folder spelled out
    assert diff(**{"train.lr": 1.0, "train.b1": 0.5, "train.weight_decay": 0.1, "train.grad_clip": 0.5,
                   "train.steps": 500, "train.log_every": 7, "checkpoint.every": 3}) == []
    assert diff(**{"train.grad_clip": 0.0}) == ["train.grad_clip"]
    assert diff(**{"model.d_model": 32}) == ["model.d_model"]
    assert diff(**{"data.vocab_size": 128}) == ["data.vocab_size"]
    assert diff(**{"data.data_dir": str(data_dir / "elsewhere")}) == ["data.data_dir"]
    assert diff(**{"train.batch_size": 64, "seed": 1}) == ["seed", "train.batch_size"]
    # A key only the synthetic kind ignores (assoc_pairs has no successors) is not a change.
    pairs = make_test_config(data_dir, **{"data.name": "assoc_pairs"}).to_dict()
    other = make_test_config(data_dir, **{"data.name": "assoc_pairs", "data.successors": 9}).to_dict()
    assert resume_differences(pairs, other) == []


def test_optimiser_structure_rule_matches_optax():
    """What resume_differences calls structural (clipping on/off) is what changes the state's tree."""
    params = {"w": jax.numpy.ones((3, 3)), "b": jax.numpy.ones(3)}

    def structure(**kw):
        train = {"lr": 1e-3, "warmup_steps": 1, "steps": 10, "end_lr": 0.0, "b1": 0.9, "b2": 0.95,
                 "weight_decay": 0.5, "grad_clip": 1.0, **kw}
        return jax.tree.structure(make_optimizer(train).init(params))

    same = [dict(grad_clip=0.5), dict(weight_decay=0.0), dict(b1=0.1), dict(lr=1.0)]
    assert all(structure(**kw) == structure() for kw in same)
    assert structure(grad_clip=0.0) != structure()
    assert isinstance(optax.clip_by_global_norm(1.0).init(params), optax.EmptyState)


def test_resume_check_against_a_saved_run(data_dir, tiny_run):
    cfg, workdir, _ = tiny_run
    before = _snapshot(workdir)
    with pytest.raises(UserError, match=r"train\.grad_clip: 1\.0 -> 0\.0 .*--config\.train\.grad_clip=1\.0"):
        plan_start(make_test_config(data_dir, **{"train.grad_clip": 0.0}), workdir)
    with pytest.raises(UserError, match=r"train\.steps=20 is below the latest checkpoint .*\(step 80\)"):
        plan_start(make_test_config(data_dir, **{"train.steps": 20}), workdir)
    same = make_test_config(data_dir, **{"data.download": True, "data.data_dir": f"{data_dir}/."})
    start = plan_start(same, workdir)
    assert start.resume_step == 80 and start.resume_meta["step"] == 80 and start.finished
    saved = start.config
    assert saved.data.download is False and saved.data.data_dir == str(data_dir)  # the saved spelling
    assert saved.raw["data"]["download"] is False and saved.raw["data"]["data_dir"] == str(data_dir)
    # A finished run is reported without opening anything for writing (metrics.jsonl included).
    result = cli.train_with_probes(make_test_config(data_dir), workdir)
    assert result.final_step == 80 and result.resumed_from == 80 and len(result.checkpoint_steps) == 8
    assert result.final_loss == read_metrics(workdir / "metrics.jsonl")[-1]["loss"]
    assert _snapshot(workdir) == before


def test_workdir_paths(tmp_path):
    for empty in ("", "  ", None):
        with pytest.raises(UserError, match="--workdir is empty"):
            Workdir.from_flag(empty)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        Workdir.from_flag(str(tmp_path / "afile"))
    assert Workdir.from_flag(str(tmp_path / "new")).root == tmp_path / "new"


def _results_table(workdir):
    """A small real results table: probe last_token at layers 0..2, two steps."""
    rows = [dict(run="r", stage="pretrain", step=s, tokens_seen=64 * s, ckpt_hash="h", probe="last_token",
                 layer=layer, head=-1, metric="rankme", value=1.0 + layer, note="")
            for s in (0, 1) for layer in range(3)]
    path = Workdir(workdir).results
    path.parent.mkdir(parents=True)
    pd.DataFrame(rows, columns=list(RESULTS_COLUMNS)).to_parquet(path)
    return workdir


def test_plot_request(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        check_plot_request(str(tmp_path / "nowhere"), None, None)
    with pytest.raises(UserError, match="no results table"):
        check_plot_request(str(tmp_path), None, None)
    workdir = _results_table(tmp_path / "run")
    with pytest.raises(UserError, match=r"--layer=99 is not a layer of probe 'last_token' \(layers: 0, 1, 2\)"):
        check_plot_request(str(workdir), None, 99)
    with pytest.raises(UserError, match=r"--probe=last_tokn has no rows .*did you mean 'last_token'"):
        check_plot_request(str(workdir), "last_tokn", None)
    assert check_plot_request(str(workdir), "last_token", 2) == workdir
    assert not (workdir / "plots").exists()
    Workdir(workdir).phases.write_text("step,phase\n")  # an earlier plot's output is rewritten: no error
    assert check_plot_request(str(workdir), None, None) == workdir


def test_disk_full_is_one_line_and_other_errors_keep_their_traceback(capsys):
    with pytest.raises(OSError) as full:
        with open("/dev/full", "w") as fh:
            fh.write("x")
            fh.flush()
    assert full.value.errno == errno.ENOSPC
    wrapped = RuntimeError("checkpoint save failed")
    wrapped.__cause__ = full.value
    with pytest.raises(SystemExit) as e, cli.user_errors():
        raise wrapped
    assert e.value.code == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.startswith("error: No space left on device") and err.count("\n") == 1
    with pytest.raises(ValueError, match="a bug"), cli.user_errors():  # not swallowed
        raise ValueError("a bug")


def test_download_errors_say_what_failed(tmp_path):
    import importlib_resources  # noqa: F401  (setup.py installs it: TFDS's published builders need it)

    try:
        socket.getaddrinfo("entropy-jax-no-such-host.invalid", 443)
    except OSError as e:
        offline = e
    else:
        pytest.skip("the .invalid domain resolved")
    assert download_failure(offline).startswith("the network is unreachable from here (gaierror")
    try:
        import entropy_jax_no_such_module  # noqa: F401
    except ImportError as e:
        missing = e
    assert download_failure(missing) == ("the Python package 'entropy_jax_no_such_module' is missing "
                                         "(pip install entropy_jax_no_such_module)")
    with pytest.raises(DatasetUnavailableError, match="downloading is disabled") as e:
        load_corpus({"name": "tiny_shakespeare", "data_dir": str(tmp_path), "download": False}, 64)
    assert isinstance(e.value, UserError) and isinstance(e.value, FileNotFoundError)


def test_config_flag_problems_before_absl():
    tiny = f"{CONFIG}:tiny"
    problem = cli.config_override_problem(["x", "--config.train.stepz=3"], tiny)
    assert problem.startswith("unknown config key --config.train.stepz: config.train has no 'stepz'; did you "
                              "mean 'steps'?")
    assert "config.probes.last_token has no 'dse_sigm'; did you mean 'dse_sigma'" in cli.config_override_problem(
        ["x", f"--config={tiny}", "--config.probes.last_token.dse_sigm=1"], None)
    assert "no config file 'nope.py'" in cli.config_override_problem(["x", "--config=nope.py"], tiny)
    assert "ValueError: unknown preset 'huge'" in cli.config_override_problem(["x", f"--config={CONFIG}:huge"], None)
    assert cli.config_override_problem(["x", "--noconfig.data.download", "--config.train.steps=5"], tiny) is None
    assert cli.config_override_problem(["x"], None) is None


def _start(script, *args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_entry_points_refuse_bad_input_with_one_line(tmp_path, data_dir, tiny_run):
    """One real process per entry point (started together): exit 2, one line on stderr, nothing written."""
    _, trained, _ = tiny_run
    _results_table(tmp_path / "plotted")
    before = _snapshot(trained)
    test = [f"--config={CONFIG}:test", f"--config.data.data_dir={data_dir}", "--config.data.download=False"]
    procs = {
        "unknown key": (_start("experiments/pretrain.py", f"--workdir={tmp_path / 'a'}", "--config.train.stepz=3"),
                        "did you mean 'steps'?"),
        "resume": (_start("experiments/pretrain.py", f"--workdir={trained}", *test, "--config.model.d_model=32"),
                   "model.d_model: 16 -> 32"),
        "empty workdir": (_start("run.py", "--workdir=", *test, cwd=tmp_path), "--workdir is empty"),
        "no checkpoints": (_start("experiments/probe.py", f"--workdir={tmp_path}"), "no checkpoints in"),
        "layer": (_start("experiments/plot.py", f"--workdir={tmp_path / 'plotted'}", "--layer=99"),
                  "--layer=99 is not a layer"),
    }
    for name, (proc, message) in procs.items():
        out, err = proc.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert proc.returncode == cli.EXIT_BAD_INPUT, (name, err[-3000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (name, err[-3000:])
    assert _snapshot(trained) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plotted"]
    assert not (tmp_path / "plotted" / "plots").exists()
    assert np.isfinite(read_metrics(trained / "metrics.jsonl")[-1]["loss"])


@pytest.mark.parametrize("name,expected", [("markov", 96), ("tasks", 96), ("text_folder", 256)])
def test_the_model_is_checked_with_the_vocabulary_training_builds(name, expected, data_dir):
    """Synthetic corpora and tasks keep data.vocab_size; the byte-level text corpora have 256 tokens."""
    section = {"name": name, "vocab_size": 96, "text_dir": str(data_dir)}
    assert DataConfig.from_dict(section).model_vocab_size == expected
    if name != "text_folder":
        corpus = load_corpus(make_test_config(data_dir, **{"data.name": name, "data.vocab_size": 96}).data, 16)
        assert corpus.vocab_size == expected


def test_entry_points_keep_compiled_programs_in_the_users_cache_folder(tmp_path):
    """cli.start turns on JAX's persistent cache in ~/.cache/entropy_jax/jax (no setting given): a
    program compiled by one run is there for the next."""
    code = ("import jax, jax.numpy as jnp; from entropy_jax import cli; cli.start(['x']); "
            "f = lambda x: [x := jnp.sin(x @ x.T) + i for i in range(30)][-1].sum(); "
            "jax.jit(f)(jnp.ones((32, 32))).block_until_ready()")  # an unrolled program: compiles for > 0.1 s
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PERSISTENT", "JAX_COMPILATION_CACHE"))}
    env |= {"HOME": str(tmp_path), "XDG_CACHE_HOME": ""}
    subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    cached = list((tmp_path / ".cache" / "entropy_jax" / "jax").iterdir())
    assert cached, "no compiled program was cached"
