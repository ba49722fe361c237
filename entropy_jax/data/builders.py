"""TFDS builder for the embedded synthetic corpora (array_record files, no TensorFlow needed).

One builder, ``entropy_synthetic``, whose config selects the family member (``markov``,
``markov_mixture``, ``assoc_pairs``) and all its parameters. The config name is the kind plus a
hash of every parameter that changes the data, so different parameters never share files.
Each example is ``{"tokens": int32 [seq_len + 1]}``; the exact entropy quantities (nats/token)
are stored in ``info.metadata``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

import numpy as np
import tensorflow_datasets as tfds

from entropy_jax.data.sources import AssocPairsSource, MarkovSource, MixtureSource

SYNTHETIC_KINDS = ("markov", "markov_mixture", "assoc_pairs")
_GEN_CHUNK = 4096  # sequences generated per vectorised call


@dataclasses.dataclass(frozen=True)
class SyntheticParams:
    """Everything that determines a synthetic corpus on disk."""

    kind: str = "markov"
    vocab_size: int = 1024
    zipf_exponent: float = 1.1
    order: int = 1
    successors: int = 8
    num_topics: int = 1
    uniform: bool = False
    num_train: int = 100_000
    num_val: int = 2_048
    seed: int = 0
    seq_len: int = 64  # model sequence length T; T + 1 tokens are stored

    def relevant(self) -> dict:
        """The parameters that change the data of this kind (others are dropped from the hash)."""
        d = dataclasses.asdict(self)
        if self.kind == "assoc_pairs":
            for k in ("order", "successors", "num_topics"):
                d.pop(k)
        elif self.kind == "markov":
            d.pop("num_topics")
        return d

    def config_name(self) -> str:
        """``<kind>-v<V>-t<T>-<sha256 of the relevant parameters, 10 hex>``."""
        digest = hashlib.sha256(json.dumps(self.relevant(), sort_keys=True).encode()).hexdigest()
        return f"{self.kind}-v{self.vocab_size}-t{self.seq_len}-{digest[:10]}"


class SyntheticConfig(tfds.core.BuilderConfig):
    """A BuilderConfig carrying ``SyntheticParams``; its name encodes them all."""

    def __init__(self, params: SyntheticParams):
        if params.kind not in SYNTHETIC_KINDS:
            raise ValueError(f"unknown synthetic kind {params.kind!r}; valid: {SYNTHETIC_KINDS}")
        if params.kind == "assoc_pairs" and params.seq_len % 2:
            raise ValueError(f"assoc_pairs needs an even seq_len, got {params.seq_len}")
        super().__init__(name=params.config_name(), description=json.dumps(params.relevant()))
        self.params = params


@functools.lru_cache(maxsize=16)
def make_source(params: SyntheticParams) -> MarkovSource | MixtureSource | AssocPairsSource:
    """The numpy generator of a corpus (cached: building a chain takes up to seconds)."""
    exponent = 0.0 if params.uniform else params.zipf_exponent
    if params.kind == "assoc_pairs":
        return AssocPairsSource(params.vocab_size, exponent, params.seed)
    chains = tuple(
        MarkovSource(params.vocab_size, params.order, params.successors, exponent, params.seed, m)
        for m in range(params.num_topics if params.kind == "markov_mixture" else 1)
    )
    return chains[0] if params.kind == "markov" else MixtureSource(chains)


def entropy_metadata(params: SyntheticParams) -> dict:
    """The exact entropy quantities (nats/token) stored with the corpus.

    ``entropy_rate``: what the loss can reach over the T targets — the source rate for
    ``markov`` (targets before position ``order`` carry a little more: ``per_target_optimum``),
    the lower bound for ``markov_mixture`` (``entropy_rate_upper`` = lower + ln(M)/T), and
    ``H(keys) / 2`` for ``assoc_pairs``.
    """
    src = make_source(params)
    t = params.seq_len
    meta: dict = {"params": dataclasses.asdict(params), "units": "nats/token", "entropy_rate_upper": None}
    if isinstance(src, AssocPairsSource):
        opt = src.per_target_optimum(t)
        meta.update(entropy_rate=opt, per_target_optimum=opt, key_entropy=src.key_entropy)
    elif isinstance(src, MixtureSource):
        lo, hi = src.bounds(t)
        rates = [c.entropy_rate for c in src.chains]
        meta.update(entropy_rate=lo, entropy_rate_upper=hi, per_target_optimum=None, topic_rates=rates)
    else:
        meta.update(entropy_rate=src.entropy_rate, per_target_optimum=src.per_target_optimum(t),
                    unigram_entropy=src.chain.unigram_entropy)
    return meta


class EntropySynthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic token corpora with exactly known entropy rates (see ``entropy_metadata``)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Markov / topic-mixture / associative-pairs corpora."}
    # No checksums / package metadata files: skips a lookup that needs importlib_resources.
    code_path = None

    @property
    def params(self) -> SyntheticParams:
        """The parameters of the selected config."""
        return self.builder_config.params

    def _info(self) -> tfds.core.DatasetInfo:
        p = self.params
        return tfds.core.DatasetInfo(
            builder=self,
            description="Synthetic corpus with exact entropy rate; tokens hold T + 1 ids.",
            features=tfds.features.FeaturesDict(
                {"tokens": tfds.features.Tensor(shape=(p.seq_len + 1,), dtype=np.int32)}
            ),
            metadata=tfds.core.MetadataDict(entropy_metadata(p)),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: generated from the seed
        p = self.params
        return {
            "train": self._generate_examples(0, p.num_train),
            "validation": self._generate_examples(1, p.num_val),
        }

    def _generate_examples(self, split_id: int, num: int):
        """Vectorised generation in chunks; split streams are independent given the seed."""
        p = self.params
        src = make_source(p)
        rng = np.random.default_rng([p.seed, split_id, 0x5EED])
        for start in range(0, num, _GEN_CHUNK):
            block = src.sample(min(_GEN_CHUNK, num - start), p.seq_len + 1, rng)
            for i, row in enumerate(block):
                yield start + i, {"tokens": row}
