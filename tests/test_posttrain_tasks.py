"""Verifiable tasks: the checker on hand-made cases, the generator against it, the TFDS builder's batches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from entropy_jax import data
from entropy_jax.data import tasks
from entropy_jax.data.tasks import TaskParams, check, check_parsed, expected_answers, generate, sequences
from entropy_jax.errors import UserError

V = 64  # content tokens 0..55; PAD 63, SEP 62, markers lookup 61, copy 60, reverse 59, sort 58, add 57
SEP = 62


def test_special_ids():
    assert (tasks.pad_id(V), tasks.sep_id(V), tasks.num_content(V)) == (63, 62, 56)
    assert [tasks.marker_id(k, V) for k in tasks.KINDS] == [61, 60, 59, 58, 57]


@pytest.mark.parametrize("prompt, right, wrong", [
    ([61, 5, 7, 9, 2, 3, 4, 9, SEP], [2], [7]),  # lookup: key 9 -> 2
    ([60, 3, 1, 2, SEP], [3, 1, 2], [3, 2, 1]),  # copy
    ([59, 3, 1, 2, SEP], [2, 1, 3], [3, 1, 2]),  # reverse
    ([58, 3, 1, 2, SEP], [1, 2, 3], [3, 2, 1]),  # sort
    ([57, 7, 5, 4, SEP], [2], [9]),  # add mod 7: 5 + 4 = 9 = 2
])
def test_checker_on_hand_made_cases(prompt, right, wrong):
    p = np.array([prompt, prompt])
    a = np.array([right, wrong])
    np.testing.assert_array_equal(check(p, a, V), [True, False])
    np.testing.assert_array_equal(jax.jit(check, static_argnums=2)(jnp.asarray(p), jnp.asarray(a), V), [True, False])


@pytest.mark.parametrize("prompt, answer_len", [
    ([61, 5, 7, 9, 2, 3, 4, 8, SEP], 1),  # lookup query 8 is not a key
    ([60, 3, 1, 2, 0], 3),  # no SEP
    ([57, 7, 5, 8, SEP], 1),  # add: b >= m
    ([57, 1, 0, 0, SEP], 1),  # add: modulus 1
    ([60, 3, 1, 2, SEP], 2),  # copy of 3 tokens with a 2-token answer
    ([60, 3, 60, 2, SEP], 3),  # a special id inside the list
    ([40, 3, 1, 2, SEP], 3),  # no marker
])
def test_checker_refuses_prompts_it_cannot_parse(prompt, answer_len):
    p = np.array([prompt])
    expected, parsed = expected_answers(p, answer_len, V)
    assert not parsed[0] and not check(p, expected, V)[0]
    with pytest.raises(UserError, match="cannot parse prompt 0"):
        check_parsed(p, expected, V)


@pytest.mark.parametrize("kind, size", [("lookup", 4), ("copy", 5), ("reverse", 3), ("sort", 6), ("add", 11)])
def test_generated_examples_pass_the_checker_and_rejected_ones_fail(kind, size):
    p = TaskParams(kind=kind, size=size, vocab_size=V)
    d = generate(p, "dpo", 500)
    assert d["prompt"].shape == (500, p.prompt_len) and d["answer"].shape == d["rejected"].shape == (500, p.answer_len)
    assert check(d["prompt"], d["answer"], V).all() and not check(d["prompt"], d["rejected"], V).any()
    np.testing.assert_array_equal(generate(p, "dpo", 500)["prompt"], d["prompt"])  # seeded
    assert not np.array_equal(generate(p, "sft", 500)["prompt"], d["prompt"])  # splits are separate streams
    if kind == "lookup":  # plausible: the rejected value appears among the prompt's values whenever it can
        values = d["prompt"][:, 2:2 * size + 2:2]
        can = (values != d["answer"]).any(axis=1)
        assert (values == d["rejected"])[can].any(axis=1).all()
        keys = d["prompt"][:, 1:2 * size + 1:2]
        assert all(len(set(row)) == size for row in keys)


def test_bad_task_configs_are_refused_in_one_line():
    with pytest.raises(UserError, match="not a task the checker can parse"):
        TaskParams(kind="divide")
    with pytest.raises(UserError, match="task_size=60 does not fit vocab_size=64"):
        TaskParams(kind="lookup", size=60, vocab_size=V)


def test_sequences_weight_exactly_the_answer_targets():
    p = np.array([[60, 3, 1, 2, SEP]])
    s = sequences(p, np.array([[3, 1, 2]]), seq_len=10, vocab_size=V)
    np.testing.assert_array_equal(s["inputs"][0], [60, 3, 1, 2, SEP, 3, 1, 2, 63, 63])
    np.testing.assert_array_equal(s["targets"][0], [3, 1, 2, SEP, 3, 1, 2, 63, 63, 63])
    np.testing.assert_array_equal(s["weights"][0], [0, 0, 0, 0, 1, 1, 1, 0, 0, 0])
    with pytest.raises(UserError, match="do not fit train.seq_len"):
        sequences(p, np.array([[3, 1, 2]]), seq_len=6, vocab_size=V)


def _cfg(data_dir, split, **kw):
    return ml_collections.ConfigDict(dict(name="tasks", task="lookup", task_size=3, split=split, vocab_size=V,
                                          num_train=128, num_val=32, data_seed=0, data_dir=str(data_dir), **kw))


def test_builder_batches_by_split_and_resume_exactly(data_dir):
    corpus = data.load_corpus(_cfg(data_dir, "dpo"), 16)
    assert corpus.info["prompt_len"] == 9 and len(corpus.train) == 128 and len(corpus.validation) == 32
    it = data.make_train_iterator(corpus, 8, seed=1)
    first = next(it)
    state = it.get_state()
    second = next(it)
    again = data.make_train_iterator(corpus, 8, seed=1)
    again.set_state(state)
    resumed = next(again)
    assert all(np.array_equal(second[k], resumed[k]) for k in second)
    prompts = first["inputs"][:, :9]
    assert check(prompts, first["targets"][:, 8:9], V).all()  # chosen = correct
    assert not check(prompts, first["rejected_targets"][:, 8:9], V).any()
    np.testing.assert_array_equal(first["rejected_inputs"][:, :9], prompts)
    rl = next(data.make_train_iterator(data.load_corpus(_cfg(data_dir, "rl"), 16), 8, seed=1))
    assert rl["prompts"].shape == (8, 9) and rl["answers"].shape == (8, 1) and rl["eval_prompts"].shape == (8, 9)
    assert check(rl["prompts"], rl["answers"], V).all()
    with pytest.raises(UserError, match="data.split='validation'"):
        data.load_corpus(_cfg(data_dir, "validation"), 16)
    with pytest.raises(UserError, match="more than train.seq_len"):
        data.load_corpus(_cfg(data_dir, "sft"), 6)
