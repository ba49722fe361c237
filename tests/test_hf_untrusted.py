"""Weight files, configs and workdirs from elsewhere are untrusted: every damaged input, made here
from the fixtures in tests/testdata/hf, is one ``error:`` line naming the file, exit status 2 and
nothing written; a fuzz over the safetensors reader finds no other outcome."""

import json
import shutil
import struct

import numpy as np
import pytest
from conftest import REPO
from safetensors.numpy import load_file, save_file

from entropy_jax.cli import user_errors
from entropy_jax.models import hf
from entropy_jax.models.hf import safetensors_io
from experiments import import_hf

FIXTURES = REPO / "tests" / "testdata" / "hf"
PROBE = dict(text_dir=str(FIXTURES / "text"), seq_len=16, num_sequences=24, batch_size=8)
WEIGHT = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"


def _split(path):
    """(header dict, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(header, data, length=None):
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _rewrite(path, edit):
    header, data = _split(path)
    edit(header)
    path.write_bytes(_join(header, data))


def _shift(name, by):
    def edit(header):
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
    return edit


def _replace(name, value):
    def edit(folder):
        tensors = load_file(folder / "model.safetensors")
        tensors[name] = value(tensors[name])
        save_file(tensors, folder / "model.safetensors")
    return edit


def _set_nan(folder, value):
    _replace(WEIGHT, lambda a: np.where(np.arange(a.size).reshape(a.shape) == 7, np.float32(value), a))(folder)


SAFETENSORS = "model.safetensors"
DAMAGE = {  # case -> (how the revision folder is damaged, the words the one line must hold)
    "truncated_header": (lambda f: (f / SAFETENSORS).write_bytes((f / SAFETENSORS).read_bytes()[:3000]),
                         "header length field says 3512 bytes, but the file holds 2992"),
    "truncated_data": (lambda f: (f / SAFETENSORS).write_bytes((f / SAFETENSORS).read_bytes()[:-100]),
                       "reaches past the end of the file's"),
    "five_bytes": (lambda f: (f / SAFETENSORS).write_bytes(b"\x00" * 5),
                   "it is 5 bytes, shorter than the 8-byte header length"),
    "length_2_62": (lambda f: (f / SAFETENSORS).write_bytes(struct.pack("<Q", 2**62)
                                                            + (f / SAFETENSORS).read_bytes()[8:]),
                    f"header length field says {2**62} bytes"),
    "length_2_64": (lambda f: (f / SAFETENSORS).write_bytes(struct.pack("<Q", 2**64 - 1)
                                                            + (f / SAFETENSORS).read_bytes()[8:]),
                    f"header length field says {2**64 - 1} bytes"),
    "overlap": (lambda f: _rewrite(f / SAFETENSORS, _shift("gpt_neox.final_layer_norm.bias", -40)),
                "'gpt_neox.final_layer_norm.bias' at data_offsets [23000, 23120] overlaps the tensor before it"),
    "past_end": (lambda f: _rewrite(f / SAFETENSORS, _shift("gpt_neox.layers.1.attention.bias", 4096)),
                 "'gpt_neox.layers.1.attention.bias' at data_offsets [86856, 90952] reaches past the end"),
    "config_not_json": (lambda f: (f / "config.json").write_text('{"model_type": "gpt_neox", '),
                        "config.json is not valid JSON"),
    "config_array": (lambda f: (f / "config.json").write_text("[1, 2, 3]"),
                     "config.json holds a JSON list, not an object"),
    "int_weight": (_replace(WEIGHT, lambda a: (a * 100).astype(np.int32)),
                   f"{WEIGHT} has dtype int32, a weight must be floating point"),
    "bool_weight": (_replace(WEIGHT, lambda a: a > 0), f"{WEIGHT} has dtype bool, a weight must be floating point"),
    "nan_weight": (lambda f: _set_nan(f, np.nan), f"tensor '{WEIGHT}' holds 1 non-finite values (NaN or inf)"),
    "inf_weight": (lambda f: _set_nan(f, -np.inf), f"tensor '{WEIGHT}' holds 1 non-finite values (NaN or inf)"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_revision_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    """A good revision and a damaged one: refused before the good one is written."""
    good, bad = tmp_path / "revs" / "step0", tmp_path / "revs" / "step1"
    shutil.copytree(FIXTURES / "gpt_neox", good)
    shutil.copytree(FIXTURES / "gpt_neox", bad)
    damage, words = DAMAGE[case]
    damage(bad)
    workdir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_, user_errors():
        import_hf.import_folders([str(good), str(bad)], workdir, **PROBE)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert words in err and str(bad) in err, err
    assert not workdir.exists()


def test_import_into_a_native_run_is_refused(tiny_run, tmp_path, capsys):
    _, native, _ = tiny_run
    workdir = tmp_path / "native"
    shutil.copytree(native, workdir)
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    with pytest.raises(SystemExit) as exit_, user_errors():
        import_hf.import_folders([str(FIXTURES / "gpt_neox")], workdir, step=0, **PROBE)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1, err
    assert f"--workdir={workdir} holds the checkpoints of a native pretrain run" in err, err
    assert "import into a new --workdir" in err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before
    assert not (workdir / "probes" / "tokenizer.json").exists()


def _mutations(rng, raw):
    """Damaged copies of a safetensors file's bytes: byte flips in the length field and header,
    truncations anywhere, header rewrites (dtype, shape, offsets, entries, length field).

    Flips inside the tensor data are left out: the format has no checksum, so a flipped mantissa
    bit is another valid file (the import records every file's sha256 instead)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    for _ in range(120):
        b = bytearray(raw)
        for i in rng.integers(0, 8 + n, size=rng.integers(1, 4)):
            b[i] = rng.integers(0, 256)
        yield "flip", bytes(b)
    for cut in rng.integers(0, len(raw), size=60):
        yield "truncate", raw[:cut]
    rewrites = [
        lambda e: e.update(dtype=str(rng.choice(["F16", "BF16", "F64", "I32", "I64", "BOOL", "U8", "F8_E4M3", "X"]))),
        lambda e: e.update(shape=[int(s) + int(rng.integers(-1, 2)) for s in e["shape"]] or [1]),
        lambda e: e.update(shape=e["shape"][::-1] + [1]),  # the same byte count
        lambda e: e.update(data_offsets=[int(o) + int(rng.integers(-8, 9)) for o in e["data_offsets"]]),
        lambda e: e.update(data_offsets=[e["data_offsets"][1], e["data_offsets"][0]]),
        lambda e: e.update(data_offsets=[0, 2**64]),
        lambda e: e.update(shape=[2**40, 2**40]),
        lambda e: e.update(dtype=None),
        lambda e: e.pop("shape"),
        lambda e: e.update(extra=1),
    ]
    for _ in range(120):
        h = json.loads(json.dumps(header))
        name = names[rng.integers(len(names))]
        kind = rng.integers(-2, len(rewrites) + 3)
        if kind == -2:  # harmless: other metadata, the same tensors
            h["__metadata__"] = {"format": "np", "note": "x" * int(rng.integers(100))}
        elif kind == -1:  # harmless: the same header laid out another way
            h = dict(reversed(list(h.items())))
        elif kind < len(rewrites):
            rewrites[kind](h[name])
        elif kind == len(rewrites):
            del h[name]
        elif kind == len(rewrites) + 1:
            h[name] = [1, 2]
        else:
            h = list(h)
        text = json.dumps(h).encode()
        length = len(text) + int(rng.choice([0, 0, -1, 1, 7, -8]))
        yield "rewrite", struct.pack("<Q", max(length, 0)) + text + data


def _imported_values(folder):
    """What the import takes from a revision folder: its checks, then the converted parameters."""
    cfg = hf.check_hf_folder(folder)
    params, state = hf.convert(hf.read_config(folder)["model_type"], cfg, hf.read_tensors(folder), where=str(folder))
    flat = {}
    for prefix, tree in (("params", params), ("state", state)):
        stack = [(prefix, tree)]
        while stack:
            key, node = stack.pop()
            if isinstance(node, dict):
                stack += [(f"{key}/{k}", v) for k, v in node.items()]
            else:
                flat[key] = np.asarray(node)
    return flat


@pytest.mark.parametrize("fixture", ["gpt_neox/model.safetensors", "gpt2/model-00002-of-00003.safetensors"])
def test_fuzzed_safetensors_load_identically_or_fail_in_one_line(fixture, tmp_path):
    """300 damaged copies of one weight file: the reader raises nothing but HFImportError, and the
    import either takes exactly the undamaged values or refuses in one line naming the file."""
    source = FIXTURES / fixture
    folder = tmp_path / "rev"
    shutil.copytree(source.parent, folder)
    expected = _imported_values(folder)
    path = folder / source.name
    rng = np.random.default_rng(0)
    outcomes = {"identical": 0, "refused": 0}
    for kind, raw in _mutations(rng, source.read_bytes()):
        path.write_bytes(raw)
        try:
            safetensors_io.read_header(path)
        except hf.HFImportError as e:
            assert str(path) in str(e) and "\n" not in str(e), (kind, str(e))
        try:
            got = _imported_values(folder)
        except hf.HFImportError as e:
            assert str(folder) in str(e) and "\n" not in str(e), (kind, str(e))
            outcomes["refused"] += 1
            continue
        assert got.keys() == expected.keys(), kind
        for name, value in expected.items():
            assert got[name].dtype == value.dtype, (kind, name)
            np.testing.assert_array_equal(got[name], value, err_msg=f"{kind} {name}")
        outcomes["identical"] += 1
    assert sum(outcomes.values()) == 300 and outcomes["refused"] > 200 and outcomes["identical"] > 0, outcomes
