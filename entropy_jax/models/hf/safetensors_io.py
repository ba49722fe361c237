"""Reading Hugging Face weight files without torch: a bounded, checked safetensors reader.

A revision folder holds ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
(``weight_map``: tensor name -> file). The file format is an 8-byte little-endian header length,
a JSON header of ``{name: {dtype, shape, data_offsets}}``, then the raw little-endian bytes.
These files come from elsewhere, so every field is checked against the file before a byte of
data is read (:func:`read_header`), and each tensor is read with exactly the bytes its entry
names: a truncated, overwritten or hostile file is one :class:`HFImportError` line naming the
file, never another exception or a silently wrong value. BF16 tensors are widened exactly to
float32; floating tensors holding NaN or inf are refused. Folders with only
``pytorch_model.bin`` (pickled torch tensors) are refused.
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


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (config.json, tokenizer.json, the shard index)."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, hostile nesting
        raise HFImportError(f"{path} is not valid JSON ({str(e).splitlines()[0]}); download it again") from None
    if not isinstance(value, dict):
        raise HFImportError(f"{path} holds a JSON {type(value).__name__}, not an object; download it again")
    return value


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, each a plain file name in the index's folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) and f and Path(f).name == f and f not in (".", "..") for f in weight_map.values()):
        raise HFImportError(f"{index} has no weight_map of tensor names to shard file names in its folder; "
                            "download the complete revision")
    return weight_map


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a revision folder, in a stable order."""
    folder = Path(folder)
    if (folder / INDEX).exists():
        files = sorted({folder / f for f in _weight_map(folder / INDEX).values()})
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


# Every safetensors dtype with a numpy type; weights must be one of FLOATING (checked where the
# family takes them), the others are stored buffers (causal masks) that families drop.
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
          "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
FLOATING = ("F32", "F16", "BF16", "F64")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own cap on the JSON header
_LENGTH_BYTES = 8


def _damaged(path: Path, what: str) -> HFImportError:
    return HFImportError(f"{path}: {what}; the file is damaged or not a safetensors file: download it again")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate names {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _check_entry(path: Path, name: str, entry: object) -> tuple[int, int]:
    """The (start, stop) byte range of one header entry, after checking its dtype, shape and size."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _damaged(path, f"tensor {name!r} has a malformed header entry")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise HFImportError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this importer cannot read; "
                            f"weights must be floating point ({', '.join(FLOATING)})")
    ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)
    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise _damaged(path, f"tensor {name!r} has an invalid shape {shape!r} or data_offsets {offsets!r}")
    size = int(np.prod(shape, dtype=object)) * np.dtype(DTYPES[dtype]).itemsize
    if offsets[1] - offsets[0] != size:
        raise _damaged(path, f"tensor {name!r} ({dtype} {shape}) needs {size} bytes but its data_offsets "
                             f"{offsets} span {offsets[1] - offsets[0]}")
    return offsets[0], offsets[1]


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a safetensors file's JSON header (``__metadata__`` dropped) and the
    byte position where the data starts, every field checked against the file before any data is
    read: the header length is bounded by the file and :data:`MAX_HEADER_BYTES`, each entry's byte
    count equals its shape times its dtype's size, and the entries tile the data exactly (no
    overlap, no gap, nothing past the end). Any damage is an :class:`HFImportError` naming the file."""
    path = Path(path)
    size = path.stat().st_size
    if size < _LENGTH_BYTES:
        raise _damaged(path, f"it is {size} bytes, shorter than the 8-byte header length")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(_LENGTH_BYTES))
        if n > min(size - _LENGTH_BYTES, MAX_HEADER_BYTES):
            raise _damaged(path, f"its header length field says {n} bytes, but the file holds {size - _LENGTH_BYTES} "
                                 f"after it (at most {MAX_HEADER_BYTES} are allowed)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, duplicate names, hostile nesting
        raise _damaged(path, f"its header is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise _damaged(path, f"its header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    data = size - _LENGTH_BYTES - n
    ranges = sorted((_check_entry(path, name, e), name) for name, e in header.items())
    end = 0
    for (start, stop), name in ranges:
        if stop > data:
            raise _damaged(path, f"tensor {name!r} at data_offsets [{start}, {stop}] reaches past the end of the "
                                 f"file's {data} data bytes (a truncated download?)")
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves bytes {end}..{start} unused"
            raise _damaged(path, f"tensor {name!r} at data_offsets [{start}, {stop}] {what}")
        end = stop
    if end != data:
        raise _damaged(path, f"its tensors end at byte {end} of the data, the file holds {data}")
    return header, _LENGTH_BYTES + n


def _read(path: Path, f, base: int, name: str, entry: dict) -> np.ndarray:
    """One tensor, copied from the file; BF16 widened exactly to float32 (bfloat16 is float32's top
    16 bits); floating tensors refused when they hold NaN or inf."""
    start, stop = entry["data_offsets"]
    dtype = np.dtype(DTYPES[entry["dtype"]])
    f.seek(base + start)
    raw = f.read(stop - start)
    if len(raw) != stop - start:
        raise _damaged(path, f"tensor {name!r} was cut short while reading (the file changed?)")
    a = np.frombuffer(raw, dtype).reshape(entry["shape"])
    if entry["dtype"] == "BF16":
        a = (a.astype(np.uint32) << 16).view(np.float32)
    if entry["dtype"] in FLOATING and not np.isfinite(a).all():
        bad = a.size - int(np.isfinite(a).sum())
        raise HFImportError(f"{path}: tensor {name!r} holds {bad} non-finite values (NaN or inf) of {a.size}: "
                            "a damaged download or a diverged checkpoint, not imported; download it again")
    return a


def iter_tensors(folder: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) for every tensor of every weight file of ``folder``, one at a time (memory
    bounded by the largest tensor); BF16 widened to float32, other dtypes as stored."""
    for path in weight_files(Path(folder)):
        header, base = read_header(path)
        with open(path, "rb") as f:
            for name, entry in header.items():
                yield name, _read(path, f, base, name, entry)


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of ``folder`` by name (a name in two shards is refused)."""
    tensors: dict[str, np.ndarray] = {}
    for name, array in iter_tensors(folder):
        if name in tensors:
            raise HFImportError(f"{folder}: tensor {name!r} is in two weight files; download the revision again")
        tensors[name] = array
    return tensors


def tensor_specs(folder: Path) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Name -> (dtype as read, shape) of every tensor, from the checked headers (no tensor data read)."""
    specs = {}
    for path in weight_files(Path(folder)):
        for name, e in read_header(path)[0].items():
            if name in specs:
                raise HFImportError(f"{path}: tensor {name!r} is also in another weight file of {folder}; "
                                    "download the revision again")
            dtype = np.dtype(np.float32 if e["dtype"] == "BF16" else DTYPES[e["dtype"]])
            specs[name] = (dtype, tuple(e["shape"]))
    return specs


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
