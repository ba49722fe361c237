"""The verifiable-tasks TFDS builder (array_record, generated locally) and its training batches.

``cfg.data`` of a fine-tuning stage: ``name="tasks"``, ``task`` (a kind of
:mod:`entropy_jax.data.tasks`), ``task_size``, ``split`` (which stream this stage trains on),
``vocab_size`` (the pretraining vocabulary), ``num_train`` (examples per training split),
``num_val``, ``data_seed``, ``data_dir``; for ``task="fact"`` also the pretraining corpus's
``zipf_exponent`` and ``corpus_seed`` and ``heldout_keys``. The corpus's ``validation`` (and, for
fact, ``validation_ood``) sources hold held-out prompts with their answers and rejected answers;
``facts`` is the checker's table (None but for fact). Batches, by split (all int32 ``[B, ...]`` but weights):

* ``sft``: ``inputs``, ``targets`` ``[B, T]`` and ``weights`` float32 ``[B, T]`` (1 on answer targets);
* ``dpo``: those for the chosen (correct) answer plus ``rejected_inputs``, ``rejected_targets``,
  ``rejected_weights`` for the rejected one (same prompt);
* ``rl``: ``prompts`` ``[B, P]``, ``answers`` ``[B, A]`` (their length fixes how many tokens to
  sample; rewards come from the checker) and ``eval_prompts`` ``[B, P]``, held-out prompts that
  cycle through the validation split (for pass@1); for fact, ``facts`` ``[B, V]`` (the checker's
  table, one row per prompt so that it is sharded like them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds

from entropy_jax.data.pipeline import local_batch_indices
from entropy_jax.data.tasks import TaskParams, generate, sequences
from entropy_jax.errors import UserError

TRAIN_SPLITS = ("sft", "dpo", "rl")
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=8)


class TaskConfig(tfds.core.BuilderConfig):
    """A BuilderConfig carrying ``TaskParams``; its name encodes them all."""

    def __init__(self, params: TaskParams):
        super().__init__(name=params.config_name(), description=json.dumps(dataclasses.asdict(params)))
        self.params = params


class VerifiableTasks(tfds.core.GeneratorBasedBuilder):
    """Prompts, correct answers and plausible wrong ones, checked by :func:`entropy_jax.data.tasks.check`."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "lookup / copy / reverse / sort / modular addition / corpus facts."}
    code_path = None  # no checksums or package metadata files to look up

    def _info(self) -> tfds.core.DatasetInfo:
        p: TaskParams = self.builder_config.params
        tensor = lambda n: tfds.features.Tensor(shape=(n,), dtype=np.int32)
        return tfds.core.DatasetInfo(
            builder=self, description="Verifiable tasks: prompt, correct answer, rejected (wrong) answer.",
            features=tfds.features.FeaturesDict(
                {"prompt": tensor(p.prompt_len), "answer": tensor(p.answer_len), "rejected": tensor(p.answer_len)}),
            metadata=tfds.core.MetadataDict(params=dataclasses.asdict(p)), disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # generated from the seed, nothing to download
        p: TaskParams = self.builder_config.params
        return {s: self._generate_examples(s, p.num_val if s.startswith("validation") else p.num_train)
                for s in p.splits}

    def _generate_examples(self, split: str, num: int):
        fields = generate(self.builder_config.params, split, num)
        for i in range(num):
            yield i, {k: v[i] for k, v in fields.items()}


@dataclasses.dataclass(frozen=True)
class TaskCorpus:
    """A prepared task dataset, read as the ``split`` stream (the fields the training loop reads of a corpus)."""

    name: str
    vocab_size: int
    seq_len: int
    entropy_rate: None
    entropy_rate_upper: None
    train: Any  # the split's random-access source
    validation: Any
    info: dict
    task: TaskParams
    split: str
    validation_ood: Any = None  # fact: the held-out rare keys' source
    facts: np.ndarray | None = None  # fact: the checker's table (entropy_jax.data.tasks.check's facts)


def task_params(data_cfg: Any) -> TaskParams:
    g, d = data_cfg.get, TaskParams()
    return TaskParams(kind=g("task", d.kind), size=int(g("task_size", d.size)),
                      vocab_size=int(g("vocab_size", d.vocab_size)), num_train=int(g("num_train", d.num_train)),
                      num_val=int(g("num_val", d.num_val)), seed=int(g("data_seed", d.seed)),
                      zipf_exponent=float(g("zipf_exponent", d.zipf_exponent)),
                      corpus_seed=int(g("corpus_seed", d.corpus_seed)),
                      heldout_keys=int(g("heldout_keys", d.heldout_keys)))


Prepare = Callable[[Callable[[], tfds.core.DatasetBuilder]], tfds.core.DatasetBuilder]


def load_task_corpus(data_cfg: Any, seq_len: int, data_dir: str, prepare: Prepare) -> TaskCorpus:
    """Prepare (once) and open the task dataset of ``data_cfg``; ``prepare`` generates the files."""
    params, split = task_params(data_cfg), data_cfg.get("split", "sft")
    if split not in TRAIN_SPLITS:
        raise UserError(f"data.split={split!r} is not a training split of the tasks; choose one of {TRAIN_SPLITS}")
    if params.prompt_len + params.answer_len > seq_len + 1:
        raise UserError(f"data.task={params.kind!r} of size {params.size} needs {params.prompt_len} prompt + "
                         f"{params.answer_len} answer tokens, more than train.seq_len + 1 = {seq_len + 1}; "
                         "choose a smaller data.task_size")
    config = TaskConfig(params)
    builder = prepare(lambda: VerifiableTasks(config=config, data_dir=data_dir, file_format="array_record"))
    info = {"builder": builder.name, "config": builder.builder_config.name, "version": str(builder.version),
            "data_dir": data_dir, "path": os.fspath(builder.data_path), "split": split,
            "prompt_len": params.prompt_len, "answer_len": params.answer_len, "params": dataclasses.asdict(params)}
    return TaskCorpus(name="tasks", vocab_size=params.vocab_size, seq_len=seq_len, entropy_rate=None,
                      entropy_rate_upper=None, train=builder.as_data_source(split),
                      validation=builder.as_data_source("validation"), info=info, task=params, split=split,
                      validation_ood=builder.as_data_source("validation_ood") if "validation_ood" in params.splits
                      else None, facts=params.facts())


def stack_records(records: list[dict], key: str) -> np.ndarray:
    """Field ``key`` of task records (dicts read from a split's source), stacked as int32 ``[N, ...]``."""
    return np.stack([np.asarray(r[key], dtype=np.int32) for r in records])


class _ReadTaskBatch(grain.transforms.MapWithIndex):
    """(batch index, record indices) -> one batch of the corpus's split (see the module docstring)."""

    def __init__(self, corpus: TaskCorpus, rows: int, offset: int):
        self.corpus, self.rows, self.offset = corpus, rows, offset  # this process's rows of the global batch

    def map_with_index(self, index: int, indices: np.ndarray) -> dict[str, np.ndarray]:
        c = self.corpus
        records = c.train.__getitems__([int(i) for i in indices])
        prompts, answers = stack_records(records, "prompt"), stack_records(records, "answer")
        if c.split == "rl":
            n_val = len(c.validation)
            start = index * self.rows * jax.process_count() + self.offset
            held_out = c.validation.__getitems__([(start + j) % n_val for j in range(self.rows)])
            batch = {"prompts": prompts, "answers": answers, "eval_prompts": stack_records(held_out, "prompt")}
            return batch if c.facts is None else batch | {"facts": np.tile(c.facts, (self.rows, 1))}
        batch = sequences(prompts, answers, c.seq_len, c.vocab_size)
        if c.split == "dpo":
            rejected = sequences(prompts, stack_records(records, "rejected"), c.seq_len, c.vocab_size)
            batch |= {f"rejected_{k}": v for k, v in rejected.items()}
        return batch


def make_task_iterator(corpus: TaskCorpus, batch_size: int, seed: int, *, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """Infinite, deterministic, checkpointable iterator of this process's rows of the global batches of
    ``corpus.split`` (``get_state``/``set_state`` resume exactly, as for the pretraining corpora)."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    ds = local_batch_indices(len(corpus.train), batch_size, seed, index, count, f"{corpus.split} examples")
    local = batch_size // count
    ds = ds.map_with_index(_ReadTaskBatch(corpus, local, index * local))
    return iter(ds.to_iter_dataset(_READ_OPTIONS))
