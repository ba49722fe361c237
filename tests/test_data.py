"""Synthetic corpora: exact entropy rates, Zipf skew, determinism, TFDS files, grain pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import logsumexp

from entropy_jax.data import load_corpus, make_train_iterator, probe_set
from entropy_jax.data.builders import SyntheticParams, entropy_metadata, make_source
from entropy_jax.data.sources import AssocPairsSource, MarkovSource, entropy, zipf_weights


def _cfg(tmp_path, **kw) -> dict:
    base = dict(name="markov", vocab_size=256, zipf_exponent=1.1, order=1, successors=8, num_topics=1,
                uniform=False, num_train=40, num_val=16, data_seed=0, data_dir=str(tmp_path), text_dir="")
    return {**base, **kw}


def _within(emp: np.ndarray, value: float, k: float = 4.0) -> bool:
    """|mean(emp) - value| within k standard errors (rows independent)."""
    se = emp.std(ddof=1) / np.sqrt(emp.size)
    return abs(emp.mean() - value) < k * se


@pytest.mark.parametrize("vocab,order,succ", [(512, 1, 8), (128, 2, 6), (64, 3, 4)])
def test_markov_rate_is_exact(vocab, order, succ):
    src = MarkovSource(vocab, order, succ, 1.1, seed=3)
    x = src.sample(3000, 65, np.random.default_rng(0))
    nll = -src.chain.log_prob(x)
    assert np.isfinite(nll).all()  # every sampled transition is an allowed one
    assert _within(nll.mean(axis=1), src.entropy_rate)
    assert src.per_target_optimum(64) >= src.entropy_rate - 1e-12
    if order == 1:
        assert src.per_target_optimum(64) == pytest.approx(src.entropy_rate)


def test_stationary_start_and_zipf_skew():
    src = MarkovSource(1024, 1, 8, 1.1, seed=0)
    pi = np.sort(src.chain.unigram)[::-1]
    ranks = np.arange(1, 1025)
    slope = np.polyfit(np.log(ranks), np.log(pi), 1)[0]
    assert abs(slope + 1.1) < 0.05  # fitted log-log slope of the stationary unigram distribution
    x = src.sample(2000, 8, np.random.default_rng(1))
    first = np.bincount(x[:, 0], minlength=1024)[:10] / 2000  # first token ~ stationary
    p = src.chain.unigram[:10]
    assert (np.abs(first - p) < 4 * np.sqrt(p * (1 - p) / 2000)).all()
    flat = make_source(SyntheticParams(vocab_size=1024, uniform=True))
    assert np.ptp(np.log(flat.chain.unigram)) < 0.05  # the uniform control


def test_mixture_bounds_hold_for_the_bayes_predictor():
    p = SyntheticParams(kind="markov_mixture", vocab_size=128, num_topics=4, seq_len=32)
    src, meta = make_source(p), entropy_metadata(p)
    lo, hi = meta["entropy_rate"], meta["entropy_rate_upper"]
    assert lo < hi and hi - lo == pytest.approx(np.log(4) / 32)
    assert lo == pytest.approx(np.mean(meta["topic_rates"]))
    x = src.sample(3000, 33, np.random.default_rng(0))
    # log p(x_0..x_T) under each topic, then the mixture's posterior-predictive total
    joint = np.stack([np.log(c.chain.unigram[x[:, 0]]) + c.chain.log_prob(x).sum(1) for c in src.chains])
    first = np.stack([np.log(c.chain.unigram[x[:, 0]]) for c in src.chains])
    nll = -(logsumexp(joint, axis=0) - logsumexp(first, axis=0)) / 32
    se = nll.std(ddof=1) / np.sqrt(nll.size)
    assert lo - 4 * se < nll.mean() < hi + 4 * se
    assert make_source(p).chains[0].entropy_rate != make_source(p).chains[1].entropy_rate


def test_assoc_pairs_structure_and_optimum(tmp_path):
    src = AssocPairsSource(256, 1.2, seed=5)
    x = src.sample(4000, 65, np.random.default_rng(0))
    keys = x[:, 1::2]
    np.testing.assert_array_equal(x[:, 2::2], src.permutation[keys])
    inputs = x[:, :64]
    assert (inputs[:, -1] == keys[:, -1]).all()  # the last input is always a key
    assert src.per_target_optimum(64) == pytest.approx(entropy(zipf_weights(256, 1.2)) / 2)
    freq = np.bincount(keys.ravel(), minlength=256) / keys.size
    assert freq[0] > 20 * freq[128:].mean()  # Zipf-skewed keys, rank = id
    assert _within(-np.log(zipf_weights(256, 1.2)[keys]).mean(1) / 2, src.per_target_optimum(64))
    with pytest.raises(ValueError, match="even"):
        load_corpus(_cfg(tmp_path, name="assoc_pairs"), 63)


def test_tfds_files_are_deterministic_and_reused(tmp_path):
    a = load_corpus(_cfg(tmp_path / "a"), 16)
    b = load_corpus(_cfg(tmp_path / "b"), 16)
    c = load_corpus(_cfg(tmp_path / "c", data_seed=1), 16)
    rows = lambda corpus: np.stack([corpus.train[i]["tokens"] for i in range(len(corpus.train))])
    assert rows(a).dtype == np.int32 and rows(a).shape == (40, 17)
    np.testing.assert_array_equal(rows(a), rows(b))
    assert not np.array_equal(rows(a), rows(c))
    assert a.info["config"] == b.info["config"] != c.info["config"]
    json.dumps(a.info)
    assert a.entropy_rate == pytest.approx(make_source(SyntheticParams(vocab_size=256, num_train=40,
                                                                      num_val=16, seq_len=16)).entropy_rate)
    again = load_corpus(_cfg(tmp_path / "a"), 16)
    assert again.info == a.info and again.entropy_rate == a.entropy_rate


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="valid names"):
        load_corpus(_cfg(tmp_path, name="nope"), 16)
    with pytest.raises(ValueError, match="longer"):
        load_corpus(_cfg(tmp_path, stored_seq_len=8), 16)
    with pytest.raises(ValueError, match="even"):  # a cropped assoc_pairs must still end on a key
        load_corpus(_cfg(tmp_path, name="assoc_pairs", stored_seq_len=16), 15)


def test_longer_stored_sequences_are_cropped(tmp_path):
    cfg = _cfg(tmp_path, name="markov_mixture", num_topics=2, stored_seq_len=32)
    corpus = load_corpus(cfg, 16)
    assert next(make_train_iterator(corpus, 8, 0))["inputs"].shape == (8, 16)
    assert corpus.entropy_rate_upper - corpus.entropy_rate == pytest.approx(np.log(2) / 16)
    assert corpus.info["stored_seq_len"] == 32


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_iterator_resumes_exactly_across_epochs(tmp_path):
    corpus = load_corpus(_cfg(tmp_path), 16)  # 40 sequences, batch 8: 5 batches per epoch
    it = make_train_iterator(corpus, 8, seed=3)
    _take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = _take(it, 9)  # crosses two epoch boundaries
    resumed = make_train_iterator(corpus, 8, seed=3)
    resumed.set_state(state)
    for want, got in zip(expected, _take(resumed, 9), strict=True):
        np.testing.assert_array_equal(want["inputs"], got["inputs"])
        np.testing.assert_array_equal(want["targets"], got["targets"])
    first = _take(make_train_iterator(corpus, 8, seed=3), 10)
    b = first[0]
    assert b["inputs"].shape == (8, 16) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    epoch = lambda bs: np.concatenate([x["inputs"][:, 0] for x in bs])
    assert sorted(epoch(first[:5])) == sorted(epoch(first[5:]))  # each epoch is a permutation
    assert not np.array_equal(epoch(first[:5]), epoch(first[5:]))  # reshuffled
    other = next(make_train_iterator(corpus, 8, seed=4))
    assert not np.array_equal(other["inputs"], b["inputs"])


def test_iterator_shards_by_process(tmp_path):
    """Each process reads its rows of the one global batch: together they are the 1-process batch."""
    corpus = load_corpus(_cfg(tmp_path), 16)
    parts = [_take(make_train_iterator(corpus, 8, 0, process_index=i, process_count=2), 3) for i in (0, 1)]
    whole = _take(make_train_iterator(corpus, 8, 0), 3)
    assert parts[0][0]["inputs"].shape == (4, 16)
    for step in range(3):
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]),
                                          whole[step][key])
    seen = [{r.tobytes() for b in p for r in b["inputs"]} for p in parts]
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]
    with pytest.raises(ValueError, match="divisible"):
        make_train_iterator(corpus, 7, 0, process_index=0, process_count=2)


def test_probe_set_is_fixed(tmp_path):
    corpus = load_corpus(_cfg(tmp_path), 16)
    probe, digest = probe_set(corpus, 10)
    assert probe.shape == (10, 16) and probe.dtype == np.int32
    np.testing.assert_array_equal(probe[3], corpus.validation[3]["tokens"][:16])
    again, digest2 = probe_set(load_corpus(_cfg(tmp_path), 16), 10)
    assert digest == digest2 and len(digest) == 64
    np.testing.assert_array_equal(probe, again)
    assert probe_set(corpus, 9)[1] != digest
