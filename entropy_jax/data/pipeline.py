"""The grain input pipeline and the fixed probe set.

``make_train_iterator``: record indices -> seeded shuffle (reshuffled every epoch) -> infinite
repeat -> global batch of indices -> this process's rows of it -> one batched read -> (inputs,
targets). Every process walks the same global batches, so a run sees the same data whatever
the number of processes.
It is a grain ``DatasetIterator``:
``get_state()`` is a small JSON-serialisable dict and ``set_state(state)`` resumes so that the
following batches are exactly those of an uninterrupted iterator (epoch boundaries included,
since the shuffle of epoch e is a pure function of (seed, e)).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any, Protocol

import grain
import jax
import numpy as np

# Modest threading: records are small and in local files; the CPU is shared with the train step.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class CorpusLike(Protocol):
    seq_len: int
    train: Any
    validation: Any


def split_example(record: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """{"tokens": [>= T + 1]} -> {"inputs": tokens[:T], "targets": tokens[1:T + 1]} (int32)."""
    tokens = np.asarray(record["tokens"], dtype=np.int32)
    if tokens.shape[0] < seq_len + 1:
        raise ValueError(f"stored sequences have {tokens.shape[0]} tokens, need seq_len + 1 = {seq_len + 1}")
    return {"inputs": tokens[:seq_len], "targets": tokens[1 : seq_len + 1]}


class _ReadBatch(grain.transforms.Map):
    """Shuffled record indices -> one batch, read with a single ``__getitems__`` call.

    A batched read of array_record is about 15x faster than reading records one by one (TFDS
    decodes each record in Python), which keeps input off the train step's critical path.
    """

    def __init__(self, source: Any, seq_len: int):
        self.source, self.seq_len = source, seq_len

    def map(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        idx = [int(i) for i in indices]
        getitems = getattr(self.source, "__getitems__", None)
        records = getitems(idx) if getitems is not None else [self.source[i] for i in idx]
        rows = [split_example(r, self.seq_len) for r in records]
        return {k: np.stack([r[k] for r in rows]) for k in ("inputs", "targets")}


def make_train_iterator(
    corpus: CorpusLike,
    batch_size: int,
    seed: int,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """Infinite, deterministic, checkpointable iterator of this process's batches.

    ``batch_size`` is global: every process draws the same global batches of record indices and
    reads only its own ``batch_size // process_count`` consecutive rows of each (process i: rows
    ``[i b, (i + 1) b)``, the rows its devices hold), {"inputs": int32 [b, T], "targets": int32 [b, T]}.
    """
    ds = local_batch_indices(len(corpus.train), batch_size, seed, process_index, process_count, "training sequences")
    return iter(ds.map(_ReadBatch(corpus.train, corpus.seq_len)).to_iter_dataset(_READ_OPTIONS))


def local_batch_indices(num_records: int, batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None, what: str = "records") -> grain.MapDataset:
    """Record indices of this process's rows of every global batch: seeded shuffle (reshuffled each
    epoch), infinite repeat, global batches of ``batch_size``, rows ``[i b, (i + 1) b)`` for process i
    (``b = batch_size // process_count``, the rows its devices hold)."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if batch_size % count:
        raise ValueError(f"global batch {batch_size} is not divisible by {count} processes")
    local = batch_size // count
    if num_records < batch_size:
        raise ValueError(f"{num_records} {what}, fewer than a batch of {batch_size}")
    ds = grain.MapDataset.range(num_records).shuffle(seed=seed % 2**32).repeat(None)
    return ds.batch(batch_size, drop_remainder=True).map(lambda idx: idx[index * local:(index + 1) * local])


def probe_set(corpus: CorpusLike, num_sequences: int) -> tuple[np.ndarray, str]:
    """The first ``num_sequences`` validation inputs, int32 [M, T], and their sha256 hex digest.

    The digest is sha256 of the little-endian int32 bytes, so it is the same on every call and
    every machine for the same corpus.
    """
    n_val = len(corpus.validation)
    if num_sequences > n_val:
        raise ValueError(f"probe set of {num_sequences} asked, validation split has {n_val}")
    rows = [split_example(corpus.validation[i], corpus.seq_len)["inputs"] for i in range(num_sequences)]
    probe = np.stack(rows).astype("<i4") if rows else np.zeros((0, corpus.seq_len), "<i4")
    digest = hashlib.sha256(probe.tobytes()).hexdigest()
    return probe.astype(np.int32), digest
