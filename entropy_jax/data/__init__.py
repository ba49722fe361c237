"""Data: TFDS corpora (synthetic with exact entropy rate, text folders, published text sets),
the grain training pipeline and the fixed probe set.

    corpus = load_corpus(cfg.data, seq_len=64)
    it = make_train_iterator(corpus, batch_size=32, seed=0)   # global batch size
    batch = next(it)                                          # {"inputs", "targets"}: int32 [B, T]
    state = it.get_state(); it.set_state(state)               # JSON-serialisable, exact resume
    probe, digest = probe_set(corpus, 1024)                   # int32 [M, T], sha256 hex

``cfg.data`` keys: name, vocab_size, zipf_exponent, order, successors, num_topics, uniform,
num_train, num_val, data_seed, data_dir ("" = TFDS default), text_dir; optional: stored_seq_len
(store longer synthetic sequences than seq_len), download (published text sets; default True).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from entropy_jax.data import pipeline
from entropy_jax.data.builders import (
    SYNTHETIC_KINDS,
    EntropySynthetic,
    SyntheticConfig,
    SyntheticParams,
    entropy_metadata,
)
from entropy_jax.data.pipeline import probe_set
from entropy_jax.data.task_builder import TaskCorpus, load_task_corpus, make_task_iterator
from entropy_jax.data.text import PUBLISHED_TEXT, load_text_corpus

VALID_NAMES = (*SYNTHETIC_KINDS, "text_folder", *PUBLISHED_TEXT, "tasks")  # tasks: entropy_jax.data.tasks

__all__ = ["Corpus", "VALID_NAMES", "load_corpus", "make_train_iterator", "probe_set"]


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus: random-access splits of {"tokens": int32 [>= seq_len + 1]} records.

    ``entropy_rate`` (nats/token) is what the loss can reach (None for real text);
    ``entropy_rate_upper`` is set where only bounds are known (topic mixtures).
    """

    name: str
    vocab_size: int
    seq_len: int
    entropy_rate: float | None
    entropy_rate_upper: float | None
    train: Any
    validation: Any
    info: dict


def _get(cfg: Any, key: str, default: Any) -> Any:
    """Read a key from a ConfigDict / dict, with a default for keys the config leaves out."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "get"):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def data_dir_of(data_cfg: Any) -> str:
    """The TFDS data dir: ``data_dir`` or TFDS's default (~/tensorflow_datasets, $TFDS_DATA_DIR)."""
    path = _get(data_cfg, "data_dir", "") or ""
    return os.path.expanduser(path) if path else os.fspath(tfds.core.constants.DATA_DIR)


def synthetic_params(data_cfg: Any, seq_len: int) -> SyntheticParams:
    """The builder parameters of a synthetic ``cfg.data`` (missing keys take the defaults)."""
    d = SyntheticParams()
    return SyntheticParams(
        kind=_get(data_cfg, "name", d.kind),
        vocab_size=int(_get(data_cfg, "vocab_size", d.vocab_size)),
        zipf_exponent=float(_get(data_cfg, "zipf_exponent", d.zipf_exponent)),
        order=int(_get(data_cfg, "order", d.order)),
        successors=int(_get(data_cfg, "successors", d.successors)),
        num_topics=int(_get(data_cfg, "num_topics", d.num_topics)),
        uniform=bool(_get(data_cfg, "uniform", d.uniform)),
        num_train=int(_get(data_cfg, "num_train", d.num_train)),
        num_val=int(_get(data_cfg, "num_val", d.num_val)),
        seed=int(_get(data_cfg, "data_seed", d.seed)),
        seq_len=int(_get(data_cfg, "stored_seq_len", 0) or seq_len),
    )


def prepared(make_builder: Callable[[], tfds.core.DatasetBuilder]) -> tfds.core.DatasetBuilder:
    """Generate a builder's files once: process 0 first, the others after a barrier.

    On a shared filesystem the others then just reuse process 0's files; on local disks each
    host generates its own (identical: generation is deterministic).
    """
    if jax.process_index() == 0:
        make_builder().download_and_prepare()
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("entropy_jax.data prepared")
    builder = make_builder()  # re-read: its info now holds the splits
    builder.download_and_prepare()
    return builder


def _load_synthetic(data_cfg: Any, seq_len: int, data_dir: str) -> Corpus:
    params = synthetic_params(data_cfg, seq_len)
    if params.seq_len < seq_len:
        raise ValueError(f"stored sequences hold {params.seq_len} + 1 tokens; seq_len={seq_len} is longer")
    config = SyntheticConfig(params)
    builder = prepared(lambda: EntropySynthetic(config=config, data_dir=data_dir, file_format="array_record"))
    meta = dict(builder.info.metadata)
    if params.seq_len != seq_len:  # cropped: the optimum over the first seq_len targets
        meta.update(entropy_metadata(dataclasses.replace(params, seq_len=seq_len)), stored_seq_len=params.seq_len)
    info = {
        "builder": builder.name, "config": builder.builder_config.name, "version": str(builder.version),
        "data_dir": data_dir, "path": os.fspath(builder.data_path),
        "num_train": builder.info.splits["train"].num_examples,
        "num_validation": builder.info.splits["validation"].num_examples, **meta,
    }
    return Corpus(
        name=params.kind, vocab_size=params.vocab_size, seq_len=seq_len,
        entropy_rate=meta["entropy_rate"], entropy_rate_upper=meta.get("entropy_rate_upper"),
        train=builder.as_data_source("train"), validation=builder.as_data_source("validation"), info=info,
    )


def make_train_iterator(corpus: Corpus | TaskCorpus, batch_size: int, seed: int, **kwargs: Any):
    """The corpus's checkpointable batch iterator (see :mod:`entropy_jax.data.pipeline`; task batches:
    :mod:`entropy_jax.data.task_builder`)."""
    make = make_task_iterator if isinstance(corpus, TaskCorpus) else pipeline.make_train_iterator
    return make(corpus, batch_size, seed, **kwargs)


def load_corpus(data_cfg: Any, seq_len: int) -> Corpus | TaskCorpus:
    """Prepare (once; later calls reuse the files) and open the corpus named by ``data_cfg.name``.

    Raises ValueError for an unknown name or a seq_len longer than the stored sequences, and
    FileNotFoundError for a missing text folder or an unprepared published dataset offline.
    """
    name = _get(data_cfg, "name", "markov")
    if name not in VALID_NAMES:
        raise ValueError(f"unknown data.name {name!r}; valid names: {', '.join(VALID_NAMES)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    data_dir = data_dir_of(data_cfg)
    if name in SYNTHETIC_KINDS:
        return _load_synthetic(data_cfg, seq_len, data_dir)
    if name == "tasks":
        return load_task_corpus(data_cfg, seq_len, data_dir, prepare=prepared)
    fields = load_text_corpus(
        name, _get(data_cfg, "text_dir", ""), seq_len, data_dir, bool(_get(data_cfg, "download", True)),
        prepare=prepared,
    )
    return Corpus(name=name, vocab_size=256, seq_len=seq_len, entropy_rate=None, entropy_rate_upper=None,
                  **fields)
