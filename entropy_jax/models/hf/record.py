"""What an imported revision records: checkpoint metadata, parameter hash, probe source; and the
weight matrices of a revision folder straight from its files (no model built).

An imported revision is one checkpoint of a workdir, saved with the metadata the sweep reads:
stage ``pretrain`` (or, imported under a parent checkpoint, the stage named and the parent's
lineage: tokens continuing from the parent's, the root's probe sequences), the step parsed from
the revision name, tokens seen = step x tokens per step (or as the revision's name states),
the model config, the probe source (tokenised text, :mod:`entropy_jax.models.hf.probe_text`) and
the probe entries, plus ``source``: repo, revision, commit, model type, tokenizer size and the
sha256 of every weight file. ``params_sha256`` is the sha256 of the parameter bytes in tree order
(:func:`entropy_jax.checkpoint.content_hash`; the results table's ``ckpt_hash`` is its first 16 hex
digits); two revisions with the same one hold identical weights (published branches have served
duplicates), recorded as ``duplicate_of``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from entropy_jax.models.hf.configs import model_config, read_config, tokenizer_size
from entropy_jax.models.hf.convert import convert
from entropy_jax.models.hf.load import HFCheckpoint
from entropy_jax.models.hf.probe_text import KIND
from entropy_jax.models.hf.revisions import Revision
from entropy_jax.models.hf.safetensors_io import read_tensors

# The probe entries an imported model gets (the sweep's evaluator types; see experiments/configs).
DEFAULT_PROBES = {
    "last_token": {"type": "representation", "position": "last", "alpha_fit_range": None, "dse_sigma": 0.0},
    "mean_token": {"type": "representation", "position": "mean", "alpha_fit_range": None, "dse_sigma": 0.0},
    "attention": {"type": "attention", "num_examples": 32},
    "weights": {"type": "weights"},
    "output": {"type": "output"},
}


def probe_source(tokenizer: str | Path, seq_len: int, num_sequences: int, batch_size: int, text_dir: str = "",
                 tfds_name: str = "", tfds_split: str = "validation", data_dir: str = "") -> dict:
    """An ``hf_text`` probe source (see :mod:`entropy_jax.models.hf.probe_text`)."""
    return {"kind": KIND, "tokenizer": str(Path(tokenizer).absolute()), "seq_len": int(seq_len),
            "probe_set": {"text_dir": str(Path(text_dir).absolute()) if text_dir else "", "tfds_name": tfds_name,
                          "tfds_split": tfds_split, "data_dir": data_dir, "num_sequences": int(num_sequences),
                          "batch_size": int(batch_size)}}


def revision_meta(ckpt: HFCheckpoint, rev: Revision, *, run_id: str, tokens_per_step: int | None, source: dict,
                  probes: dict, sha256: str, duplicate_of: int | None, tokens: int | None = None,
                  lineage: dict | None = None) -> dict:
    """The checkpoint metadata of one imported revision (the keys the sweep reads, plus ``source``).

    ``tokens``: the revision's own training tokens (default ``step x tokens_per_step``);
    ``lineage``: ``{stage, parent, tokens_at_start}`` of a stage imported under a parent checkpoint
    (default: a pretraining root), whose tokens continue from the parent's."""
    lineage = lineage or {"stage": "pretrain", "parent": None, "tokens_at_start": 0}
    own = rev.step * tokens_per_step if tokens is None else tokens
    return {
        "step": rev.step,
        "tokens_seen": lineage["tokens_at_start"] + own,
        "stage": lineage["stage"],
        "run_id": run_id,
        "parent": lineage["parent"],
        "tokens_at_start": lineage["tokens_at_start"],
        "probe_source": source,
        "config": {"probe_set": dict(source["probe_set"]), "probes": probes},
        "model_config": dataclasses.asdict(ckpt.model_config),
        "source": {"repo": rev.repo, "revision": rev.name, "commit": rev.commit, "folder": str(rev.folder),
                   "model_type": ckpt.model_type, "tokenizer_size": ckpt.tokenizer_size,
                   "tokens_per_step": tokens_per_step, "files": ckpt.files, "hf_config": ckpt.hf_config},
        "params_sha256": sha256,
        "duplicate_of": duplicate_of,
    }


def weight_matrices(folder: str | Path) -> dict:
    """The parameters of a revision folder in the NNX tree's layout (nested dicts of float32 arrays),
    straight from its files: no model built, embedding rows beyond the tokenizer left out. Feed it
    to ``entropy_jax.probes.weight_spectra`` for the weights probe's statistics."""
    hf = read_config(folder)
    cfg = model_config(hf, tokenizer_size(folder))
    params, _ = convert(hf["model_type"], cfg, read_tensors(folder), where=str(folder))
    return params
