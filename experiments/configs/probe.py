r"""Probe-time choices of experiments/probe.py: every field unset (None) means "the run's own".

  python experiments/probe.py --workdir=runs/pythia160m --config.probe_set.text_dir=/data/wikitext
  python experiments/probe.py --workdir=runs/pythia160m --config.probe_set.tfds_name=wikitext \
      --config.probe_set.data_dir=~/tensorflow_datasets --config.probe_set.seq_len=256
  python experiments/probe.py --workdir=runs/demo --config.probe_set.batch_size=64

Each set field replaces the same key of the run's ``probe_set`` (the config it was trained or
imported with); the others keep the run's values. The probe set they give is saved with the
run (``probes/probe_set.npz``, with the overrides), so later sweeps of the workdir, with or
without these flags, use it. A run whose results table already holds rows on another probe set
is refused: a table holds one probe set (the error names the ways out).

Sizes, any run: ``num_sequences`` (probe sequences), ``seq_len`` (tokens each, at most the
model's max_len), ``batch_size`` (global forward batch; does not change the probe set).
Text, imported Hugging Face models only (tokenised with the model's own tokenizer.json; see
entropy_jax/models/hf/probe_text.py for the protocol): ``text_dir`` (a folder of .txt/.md files)
or ``tfds_name`` (a prepared TFDS text dataset, with ``tfds_split`` and its ``data_dir``). A
native run is always probed on its own corpus's validation split.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.probe_set = ml_collections.ConfigDict()
    c.probe_set.num_sequences = config_dict.placeholder(int)
    c.probe_set.seq_len = config_dict.placeholder(int)
    c.probe_set.batch_size = config_dict.placeholder(int)
    c.probe_set.text_dir = config_dict.placeholder(str)
    c.probe_set.tfds_name = config_dict.placeholder(str)
    c.probe_set.tfds_split = config_dict.placeholder(str)
    c.probe_set.data_dir = config_dict.placeholder(str)
    return c
