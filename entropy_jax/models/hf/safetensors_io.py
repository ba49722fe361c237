"""Reading Hugging Face weight files without torch: safetensors through its numpy backend.

A revision folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> file). The numpy backend cannot type bfloat16, so BF16 tensors
are read straight from the file format (an 8-byte little-endian header length, a JSON header of
``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes) and widened exactly
to float32. Folders with only ``pytorch_model.bin`` (pickled torch tensors) are refused.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from entropy_jax.errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class HFImportError(UserError, ValueError):
    """A Hugging Face folder this importer cannot read exactly; the message says what and how to fix it
    (one line: the entry points print it and exit with status 2)."""


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a revision folder, in a stable order."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise HFImportError(f"{folder / INDEX} lists shards that are not in the folder: {absent}; "
                                "download the complete revision")
        return files
    if (folder / SINGLE).exists():
        return [folder / SINGLE]
    if any(folder.glob("*.bin")):
        raise HFImportError(f"{folder} holds only pytorch .bin weights, which need torch to read; convert them to "
                            "safetensors first (transformers: model.save_pretrained(dir, safe_serialization=True))")
    raise HFImportError(f"{folder} holds no {SINGLE} or {INDEX}; point --hf_dir at a downloaded model revision")


def read_header(path: Path) -> dict[str, dict]:
    """The tensor entries of a safetensors file's JSON header (``__metadata__`` dropped)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _bf16_to_f32(path: Path, entry: dict) -> np.ndarray:
    """A BF16 tensor widened to float32 (exact: bfloat16 is float32's top 16 bits)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
    start, stop = entry["data_offsets"]
    raw = np.memmap(path, dtype="<u2", mode="r", offset=8 + n + start, shape=((stop - start) // 2,))
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of every weight file of ``folder``; BF16 widened to float32."""
    from safetensors import safe_open  # an install requirement; imported here to keep import time low

    for path in weight_files(Path(folder)):
        header = read_header(path)
        with safe_open(path, framework="numpy") as f:
            for name, entry in header.items():
                yield name, (_bf16_to_f32(path, entry) if entry["dtype"] == "BF16" else f.get_tensor(name))


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    return dict(iter_tensors(folder))


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor, from the headers only (no tensor data read)."""
    return {name: tuple(e["shape"]) for path in weight_files(Path(folder)) for name, e in read_header(path).items()}


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
