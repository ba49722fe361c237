"""The fact task: the assoc_pairs corpus's own key -> value map, asked as ``marker SEP k``, split by key frequency."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from entropy_jax import data
from entropy_jax.data import tasks
from entropy_jax.data.sources import AssocPairsSource, zipf_weights
from entropy_jax.data.tasks import TaskParams, check, check_parsed, expected_answers, generate
from entropy_jax.errors import UserError

V = 1024
P = TaskParams(kind="fact", size=512, vocab_size=V, num_train=2_000, num_val=512, zipf_exponent=1.2, corpus_seed=3)


def _keys(d):
    return d["prompt"][:, 2]


def test_answers_are_the_corpus_permutation():
    f = AssocPairsSource(V, 1.2, 3).permutation
    np.testing.assert_array_equal(P.facts(), f)
    assert tasks.marker_id("fact", V) == V - tasks.NUM_SPECIAL  # the last reserved id
    for split in ("sft", "dpo", "rl", "validation", "validation_ood"):
        d = generate(P, split, 300)
        np.testing.assert_array_equal(d["prompt"][:, [0, 1]], [[tasks.marker_id("fact", V), tasks.sep_id(V)]] * 300)
        np.testing.assert_array_equal(d["answer"][:, 0], f[_keys(d)])
        assert (d["rejected"][:, 0] != d["answer"][:, 0]).all()
        assert (_keys(d) < tasks.num_content(V)).all() and (d["answer"] < tasks.num_content(V)).all()
        assert (d["rejected"] < tasks.num_content(V)).all()


def test_checker_accepts_exactly_the_corpus_value_numpy_and_jitted():
    d = generate(P, "validation", 40)
    prompts = np.repeat(d["prompt"], V, axis=0)  # every prompt with every possible answer token
    answers = np.tile(np.arange(V, dtype=np.int32), 40)[:, None]
    want = answers[:, 0] == np.repeat(d["answer"][:, 0], V)
    np.testing.assert_array_equal(check(prompts, answers, V, P.facts()), want)
    jitted = jax.jit(check, static_argnums=2)
    np.testing.assert_array_equal(jitted(jnp.asarray(prompts), jnp.asarray(answers), V, jnp.asarray(P.facts())), want)
    per_row = jnp.asarray(np.tile(P.facts(), (len(prompts), 1)))  # the rl batches' layout, one table per prompt
    np.testing.assert_array_equal(jitted(jnp.asarray(prompts), jnp.asarray(answers), V, per_row), want)
    other = AssocPairsSource(V, 1.2, 4).permutation  # another corpus's facts are not these
    assert not check(d["prompt"], d["answer"], V, other).all()
    _, parsed = expected_answers(d["prompt"], 1, V)  # without the table a fact prompt does not parse
    assert not parsed.any()
    m, sep = tasks.marker_id("fact", V), tasks.sep_id(V)
    bad = np.array([[m, 5, sep], [m, sep, V - 3], [tasks.marker_id("copy", V), sep, 5], [m, 6, 5]])
    _, parsed = expected_answers(bad, 1, V, P.facts())  # key first, a reserved key, another marker, no SEP
    assert not parsed.any()
    with pytest.raises(UserError, match="cannot parse prompt 0"):
        check_parsed(d["prompt"], d["answer"], V)


def test_key_splits_are_disjoint_and_the_ood_keys_are_rarer():
    splits = P.key_splits()
    train, held, ood = splits["train"], splits["validation"], splits["validation_ood"]
    assert len(held) == len(ood) == P.heldout_keys and len(train) > 0
    assert not (set(train) & set(held) or set(train) & set(ood) or set(held) & set(ood))
    streamed = np.concatenate([_keys(generate(P, s, 2_000)) for s in ("sft", "dpo", "rl")])
    assert set(streamed) == set(train)  # the training streams use exactly the training keys
    val, val_ood = generate(P, "validation", 512), generate(P, "validation_ood", 512)
    assert set(_keys(val)) == set(held) and set(_keys(val_ood)) == set(ood)
    assert len(np.unique(_keys(val)[:len(held)])) == len(held)  # the first rows are distinct prompts
    assert np.bincount(_keys(val), minlength=V)[held].min() == 2  # 512 rows = every key twice
    w = zipf_weights(V, P.zipf_exponent)  # frequency under the corpus's law (id = rank)
    assert w[ood].max() < w[np.concatenate([train, held])].min()
    assert (train < P.size).all() and (held < P.size).all() and (ood >= P.size).all()
    for keys in (train, held, ood):
        assert (P.facts()[keys] < tasks.num_content(V)).all()


def test_generation_is_deterministic_and_the_name_follows_the_corpus():
    a, b = generate(P, "sft", 500), generate(P, "sft", 500)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(_keys(generate(TaskParams(**{**P.__dict__, "seed": 1}), "sft", 500)), _keys(a))
    names = {TaskParams(**{**P.__dict__, k: v}).config_name()
             for k, v in [("zipf_exponent", 1.2), ("zipf_exponent", 1.1), ("corpus_seed", 4), ("heldout_keys", 200),
                          ("size", 600)]}
    assert len(names) == 5 and P.config_name() in names and P.config_name().startswith("fact512-v1024-")
    add = TaskParams(kind="add", size=10, vocab_size=V)  # other kinds do not read the corpus: same name
    assert TaskParams(kind="add", size=10, vocab_size=V, zipf_exponent=1.1, corpus_seed=5).config_name() == \
        add.config_name()
    assert TaskParams(kind="add", size=10, vocab_size=V).splits == tasks.SPLITS[:-1]


def test_bad_fact_configs_are_refused():
    with pytest.raises(UserError, match="zipf_exponent=0.0 must be > 0"):
        TaskParams(kind="fact", size=512, zipf_exponent=0.0)
    with pytest.raises(UserError, match="must leave at least one training key"):
        TaskParams(kind="fact", size=200, heldout_keys=256)


def test_builder_serves_both_held_out_splits_and_the_table(data_dir):
    v = 64
    cfg = ml_collections.ConfigDict(dict(name="tasks", task="fact", task_size=32, split="rl", vocab_size=v,
                                         num_train=128, num_val=32, data_seed=0, zipf_exponent=1.2, corpus_seed=0,
                                         heldout_keys=8, data_dir=str(data_dir)))
    corpus = data.load_corpus(cfg, 16)
    p = corpus.task
    np.testing.assert_array_equal(corpus.facts, AssocPairsSource(v, 1.2, 0).permutation)
    for split, source in (("validation", corpus.validation), ("validation_ood", corpus.validation_ood)):
        rows = source.__getitems__(list(range(len(source))))
        stored = {k: np.stack([r[k] for r in rows]) for k in ("prompt", "answer", "rejected")}
        assert all(np.array_equal(stored[k], generate(p, split, 32)[k]) for k in stored)
        assert check(stored["prompt"], stored["answer"], v, corpus.facts).all()
        assert not check(stored["prompt"], stored["rejected"], v, corpus.facts).any()
    rl = next(data.make_train_iterator(corpus, 8, seed=1))
    assert rl["facts"].shape == (8, v) and rl["prompts"].shape == (8, 3)
    assert check(rl["prompts"], rl["answers"], v, rl["facts"]).all()
    assert set(rl["prompts"][:, 2]) <= set(p.key_splits()["train"])
    sft = data.load_corpus(ml_collections.ConfigDict({**cfg.to_dict(), "split": "sft", "task": "add", "task_size": 5}),
                           16)
    assert sft.validation_ood is None and sft.facts is None
