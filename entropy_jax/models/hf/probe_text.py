"""Tokenised probe text for imported models: the model's own tokenizer over a text folder or a TFDS text set.

Protocol (the Tracing paper's, made explicit): a *document* is a blank-line separated paragraph
of a ``.txt``/``.md`` file (files in sorted order), or one example's ``text`` feature of a TFDS
text dataset split (in order). Each document is encoded with ``tokenizer.json`` (the
``tokenizers`` library, no special tokens added); documents shorter than ``seq_len`` tokens are
dropped, the rest cropped to their first ``seq_len`` tokens; the first ``num_sequences`` of them
form the probe set. The probes read the last token of each sequence after the final norm. The
set is fixed and hashed like the native one: sha256 of the little-endian int32 bytes.

The probe source a checkpoint records (``meta["probe_source"]``)::

    {"kind": "hf_text", "tokenizer": "<workdir>/probes/tokenizer.json", "seq_len": 128,
     "probe_set": {"text_dir": "/data/wikitext", "tfds_name": "", "tfds_split": "validation",
                   "data_dir": "", "num_sequences": 1024, "batch_size": 64}}
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from entropy_jax.models.hf.safetensors_io import HFImportError

TEXT_SUFFIXES = (".txt", ".md")
KIND = "hf_text"


def folder_documents(text_dir: str | Path) -> Iterator[str]:
    """Blank-line separated paragraphs of the text files under ``text_dir`` (sorted, recursive)."""
    root = Path(text_dir).expanduser()
    files = sorted(p for p in root.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()) if root.is_dir() else []
    if not files:
        raise HFImportError(f"probe_set.text_dir={text_dir} holds no {'/'.join(TEXT_SUFFIXES)} files; "
                                "point it at a folder of text files")
    for path in files:
        for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8", errors="replace")):
            if paragraph.strip():
                yield paragraph.strip()


def tfds_documents(name: str, split: str, data_dir: str = "") -> Iterator[str]:
    """The ``text`` feature of each example of a prepared TFDS text dataset (no download)."""
    import tensorflow_datasets as tfds  # only this source needs TFDS

    source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
    for example in source:
        text = example["text"]
        yield text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)


def tokenize_documents(tokenizer_path: str | Path, documents: Iterator[str], seq_len: int,
                       num_sequences: int) -> np.ndarray:
    """The first ``num_sequences`` documents of at least ``seq_len`` tokens, cropped: int32 [M, T]."""
    from tokenizers import Tokenizer  # the optional `hf` extra

    tok = Tokenizer.from_file(str(tokenizer_path))
    rows, seen = [], 0
    for doc in documents:
        seen += 1
        ids = tok.encode(doc, add_special_tokens=False).ids
        if len(ids) >= seq_len:
            rows.append(ids[:seq_len])
            if len(rows) == num_sequences:
                return np.asarray(rows, dtype=np.int32)
    raise HFImportError(f"only {len(rows)} of {seen} documents have >= {seq_len} tokens, {num_sequences} asked; "
                        "lower probe_set.num_sequences or the probe seq_len, or add text")


def probe_tokens(source: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """The fixed probe tokens of an ``hf_text`` probe source and their sha256 hex digest."""
    ps = source["probe_set"]
    if ps.get("tfds_name"):
        docs = tfds_documents(ps["tfds_name"], ps.get("tfds_split", "validation"), ps.get("data_dir", ""))
    elif ps.get("text_dir"):
        docs = folder_documents(ps["text_dir"])
    else:
        raise HFImportError("the probe set of an imported model needs text: set probe_set.text_dir (a folder of "
                            ".txt files) or probe_set.tfds_name (a prepared TFDS text dataset)")
    tokens = tokenize_documents(source["tokenizer"], docs, int(source["seq_len"]), int(ps["num_sequences"]))
    return tokens, hashlib.sha256(tokens.astype("<i4").tobytes()).hexdigest()
