"""Byte-level text corpora: local folder builder, packing, published-dataset pass-through errors."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

from entropy_jax.data import load_corpus, make_train_iterator, probe_set
from entropy_jax.data.text import PUBLISHED_TEXT


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    files = {
        "a.txt": b"the quick brown fox jumps over the lazy dog. " * 40,
        "sub/b.md": "# notes\n\u00e9t\u00e9 \u00fcber alles\n".encode() * 30,
        "c.py": b"print('hello')\n" * 50,
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "ignored.bin").write_bytes(b"\x00" * 100)
    return root, {k: files[k] for k in sorted(files)}


def _cfg(tmp_path, **kw) -> dict:
    return {"name": "text_folder", "data_dir": str(tmp_path / "tfds"), **kw}


def test_text_folder_splits_bytes_deterministically(tmp_path, folder):
    root, files = folder
    corpus = load_corpus(_cfg(tmp_path, text_dir=str(root)), 32)
    assert corpus.vocab_size == 256 and corpus.entropy_rate is None
    cut = {k: len(v) - int(len(v) * 0.1) for k, v in files.items()}
    # files in sorted path order: a.txt, c.py, sub/b.md
    train = b"".join(files[k][: cut[k]] for k in ("a.txt", "c.py", "sub/b.md"))
    val = b"".join(files[k][cut[k] :] for k in ("a.txt", "c.py", "sub/b.md"))
    assert bytes(np.asarray(corpus.train.stream)) == train
    assert bytes(np.asarray(corpus.validation.stream)) == val
    assert len(corpus.train) == (len(train) - 1) // 32
    w = corpus.train[2]["tokens"]
    assert w.dtype == np.int32 and w.shape == (33,)
    assert bytes(w.astype(np.uint8)) == train[64:97]  # stride T windows of T + 1 bytes
    again = load_corpus(_cfg(tmp_path, text_dir=str(root)), 32)
    assert again.info["config"] == corpus.info["config"]
    (root / "a.txt").write_bytes(b"changed " * 100)
    assert load_corpus(_cfg(tmp_path, text_dir=str(root)), 32).info["config"] != corpus.info["config"]


def test_text_folder_pipeline_and_probe(tmp_path, folder):
    root, _ = folder
    corpus = load_corpus(_cfg(tmp_path, text_dir=str(root)), 16)
    it = make_train_iterator(corpus, 4, seed=0)
    batch = next(it)
    assert batch["inputs"].shape == (4, 16) and batch["targets"].dtype == np.int32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    probe, digest = probe_set(corpus, 3)
    assert probe.shape == (3, 16) and probe_set(corpus, 3)[1] == digest


def test_text_folder_errors(tmp_path, folder):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_corpus(_cfg(tmp_path, text_dir=str(missing)), 16)
    with pytest.raises(FileNotFoundError):
        load_corpus(_cfg(tmp_path, text_dir=""), 16)
    root, _ = folder
    with pytest.raises(ValueError, match="seq_len"):
        load_corpus(_cfg(tmp_path, text_dir=str(root)), 10_000)


@pytest.mark.parametrize("name", PUBLISHED_TEXT)
def test_published_text_resolves_and_fails_clearly_offline(tmp_path, name):
    builder = tfds.builder(name, data_dir=str(tmp_path), file_format="array_record")
    assert builder.name == name and "text" in builder.info.features
    with pytest.raises(FileNotFoundError, match="tfds build"):
        load_corpus({"name": name, "data_dir": str(tmp_path), "download": False}, 64)
