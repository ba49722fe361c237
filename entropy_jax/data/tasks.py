"""Verifiable tasks over a pretraining vocabulary: prompts whose answers a program checks.

Every example is a fixed-length prompt and a fixed-length answer (both int32). The top
:data:`NUM_SPECIAL` ids of the vocabulary ``V`` are reserved; content tokens are ``[0, V - 8)``:

* ``PAD = V - 1`` (after the answer, never trained on), ``SEP = V - 2`` (ends every prompt but fact's),
* one marker per kind, first token of every prompt: ``V - 3 - ALL_KINDS.index(kind)``.

Kinds (``size`` is the task's one parameter):

=========  ======================================  =============  ===========================
kind       prompt                                  prompt length  answer
=========  ======================================  =============  ===========================
lookup     marker k1 v1 ... kn vn q SEP            2n + 3         the value of key q (n keys
                                                                  distinct, q one of them)
copy       marker x1 ... xn SEP                    n + 2          x1 ... xn
reverse    marker x1 ... xn SEP                    n + 2          xn ... x1
sort       marker x1 ... xn SEP                    n + 2          x1 ... xn sorted ascending
add        marker m a b SEP   (modulus m = size)   5              (a + b) mod m
fact       marker SEP k                            3              f(k), the assoc_pairs corpus's
                                                                  value of key k (size: the
                                                                  in-distribution ranks)
=========  ======================================  =============  ===========================

``fact`` (:mod:`entropy_jax.data.facts`) adds the split ``validation_ood`` (rare keys) and needs the
corpus's permutation ``f`` to check: ``facts``, int ``[V]`` (or one row per prompt, ``[N, V]``),
passed explicitly to :func:`expected_answers` / :func:`check` (without it fact prompts do not parse).
Its key comes last, at the position where pretraining showed values (and then predicted the next,
Zipf-drawn key), so the pretrained model does not answer the prompt as it stands (greedy exact match
0 on the demo) and SFT teaches the format while the facts themselves come from pretraining.

:func:`check` is the single source of truth for correctness: the generator's answers are
:func:`expected_answers` and every generated example is verified by it (chosen answers pass,
rejected ones fail) before it is stored. ``check`` works on numpy arrays and, unchanged, on
traced JAX arrays inside a jitted reward.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import jax
import jax.numpy as jnp
import numpy as np

from entropy_jax.data.facts import fact_keys, fact_table, key_splits, wrong_values
from entropy_jax.errors import UserError

KINDS = ("lookup", "copy", "reverse", "sort", "add")  # checked from the prompt alone
CORPUS_KINDS = ("fact",)  # checked against a pretraining corpus's table (the checker's ``facts``)
ALL_KINDS = KINDS + CORPUS_KINDS
# disjoint streams: SFT pairs, DPO triples, RL prompts, held out (fact: in distribution), held out out of distribution
SPLITS = ("sft", "dpo", "rl", "validation", "validation_ood")
_FACT_FIELDS = ("zipf_exponent", "corpus_seed", "heldout_keys")  # fact only (other kinds' names leave them out)
NUM_SPECIAL = 8
_CHUNK = 1024  # prompts generated per vectorised call (lookup draws a C-wide permutation per row)


def pad_id(vocab_size: int) -> int:
    return vocab_size - 1


def sep_id(vocab_size: int) -> int:
    return vocab_size - 2


def marker_id(kind: str, vocab_size: int) -> int:
    return vocab_size - 3 - ALL_KINDS.index(kind)


def num_content(vocab_size: int) -> int:
    """Content tokens are ids ``[0, V - NUM_SPECIAL)``."""
    return vocab_size - NUM_SPECIAL


@dataclasses.dataclass(frozen=True)
class TaskParams:
    """Everything that determines a task dataset on disk."""

    kind: str = "lookup"
    size: int = 4  # lookup: pairs; copy/reverse/sort: list length; add: modulus; fact: in-distribution key ranks
    vocab_size: int = 1024
    num_train: int = 20_000  # examples per training split (sft, dpo, rl)
    num_val: int = 512  # examples per held-out split (validation; fact: also validation_ood)
    seed: int = 0
    # fact: the assoc_pairs corpus whose facts are asked (its Zipf exponent and data seed), held-out frequent keys
    zipf_exponent: float = 1.2
    corpus_seed: int = 0
    heldout_keys: int = 256

    def __post_init__(self):
        if self.kind not in ALL_KINDS:
            raise UserError(f"data.task={self.kind!r} is not a task the checker can parse; choose one of {ALL_KINDS}")
        content = num_content(self.vocab_size)
        low, high = {"add": (2, content - 1), "lookup": (1, content)}.get(self.kind, (1, None))
        if self.size < low or (high is not None and self.size > high):
            raise UserError(
                f"data.task={self.kind!r} with data.task_size={self.size} does not fit vocab_size={self.vocab_size} "
                f"({content} content tokens): choose a task_size in [{low}, {high or 'seq_len'}]")
        if self.kind == "fact":
            if not self.zipf_exponent > 0:
                raise UserError(f"data.task='fact' splits keys by frequency: data.zipf_exponent={self.zipf_exponent} "
                                "must be > 0 (a Zipf-skewed corpus)")
            self.key_splits()  # refuses a split that would be empty

    @property
    def prompt_len(self) -> int:
        return {"lookup": 2 * self.size + 3, "add": 5, "fact": 3}.get(self.kind, self.size + 2)

    @property
    def answer_len(self) -> int:
        return 1 if self.kind in ("lookup", "add", "fact") else self.size

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits stored: the fact task alone has an out-of-distribution one."""
        return SPLITS if self.kind == "fact" else SPLITS[:-1]

    def facts(self) -> np.ndarray | None:
        """The checker's ``facts`` argument: the corpus's permutation ``f`` (int32 ``[V]``); None but for fact."""
        return fact_table(self.vocab_size, self.zipf_exponent, self.corpus_seed) if self.kind == "fact" else None

    def key_splits(self) -> dict[str, np.ndarray]:
        """Fact keys of ``train`` (the sft/dpo/rl streams), ``validation`` and ``validation_ood``."""
        return key_splits(self.facts(), num_content(self.vocab_size), self.size, self.heldout_keys, self.seed)

    def config_name(self) -> str:
        """``<kind><size>-v<V>-<sha256 of all parameters the kind reads, 10 hex>``."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if self.kind == "fact" or k not in _FACT_FIELDS}
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{self.kind}{self.size}-v{self.vocab_size}-{digest[:10]}"


def _xp(x):
    return jnp if isinstance(x, jax.Array) else np


def expected_answers(prompts_NxP, answer_len: int, vocab_size: int, facts=None):
    """The correct answer of each prompt, ``[N, answer_len]``, and whether the prompt parses, ``[N]`` bool.

    The kind is read from each prompt's marker; a prompt parses when it ends with SEP, its
    marker's layout fits the shapes ``(P, answer_len)``, its content tokens are content ids, and
    its parameters are valid (a lookup query among the keys, ``a, b < m`` with ``m >= 2``, a fact
    key's value a content id, with ``facts`` given). Unparsed rows hold answer 0. numpy in, numpy
    out; JAX in (traced or not), JAX out.
    """
    xp = _xp(prompts_NxP)
    n, p = prompts_NxP.shape
    a = answer_len
    body = prompts_NxP[:, 1:p - 1]
    ok = (prompts_NxP[:, p - 1] == sep_id(vocab_size)) & xp.all(body < num_content(vocab_size), axis=1)
    ok = ok & xp.all(body >= 0, axis=1)
    candidates = []  # (kind, expected [N, A], kind-specific validity [N])
    if a == p - 2 and a >= 1:
        valid = xp.ones((n,), dtype=bool)
        candidates += [("copy", body, valid), ("reverse", body[:, ::-1], valid), ("sort", xp.sort(body, axis=1), valid)]
    if a == 1 and p >= 5 and (p - 3) % 2 == 0:
        keys, values, query = body[:, 0:p - 3:2], body[:, 1:p - 3:2], prompts_NxP[:, p - 2]
        hit = keys == query[:, None]
        value = xp.take_along_axis(values, xp.argmax(hit, axis=1)[:, None], axis=1)
        candidates.append(("lookup", value, xp.any(hit, axis=1)))
    if a == 1 and p == 5:
        m, x, y = body[:, 0], body[:, 1], body[:, 2]
        valid = (m >= 2) & (x < m) & (y < m)
        candidates.append(("add", ((x + y) % xp.maximum(m, 1))[:, None], valid))
    candidates = [(kind, value, valid & ok) for kind, value, valid in candidates]
    if a == 1 and p == 3 and facts is not None:  # marker SEP k: SEP first, the key last
        key, facts = prompts_NxP[:, 2:], xp.asarray(facts)  # [N, 1]
        safe = xp.clip(key, 0, vocab_size - 1)
        value = facts[safe[:, 0]][:, None] if facts.ndim == 1 else xp.take_along_axis(facts, safe, axis=1)
        valid = (prompts_NxP[:, 1] == sep_id(vocab_size)) & (key[:, 0] >= 0) & (key[:, 0] < num_content(vocab_size))
        candidates.append(("fact", value, valid & (value[:, 0] >= 0) & (value[:, 0] < num_content(vocab_size))))
    answer = xp.zeros((n, a), dtype=prompts_NxP.dtype)
    parsed = xp.zeros((n,), dtype=bool)
    for kind, value, valid in candidates:
        mine = (prompts_NxP[:, 0] == marker_id(kind, vocab_size)) & valid
        answer = xp.where(mine[:, None], value.astype(prompts_NxP.dtype), answer)
        parsed = parsed | mine
    return answer, parsed


def check(prompts_NxP, answers_NxA, vocab_size: int, facts=None):
    """Whether each answer is correct for its prompt: bool ``[N]`` (False where the prompt does not parse).

    The reward of RL with verifiable rewards is this, as 0/1. Works on numpy and JAX arrays;
    ``facts`` is the fact task's table (:meth:`TaskParams.facts`), needed by fact prompts only.
    """
    xp = _xp(answers_NxA)
    expected, parsed = expected_answers(prompts_NxP, answers_NxA.shape[1], vocab_size, facts)
    return parsed & xp.all(answers_NxA == expected, axis=1)


def check_parsed(prompts_NxP: np.ndarray, answers_NxA: np.ndarray, vocab_size: int, facts=None) -> np.ndarray:
    """:func:`check` on host arrays, raising ``UserError`` naming the first prompt the checker cannot parse."""
    _, parsed = expected_answers(np.asarray(prompts_NxP), answers_NxA.shape[1], vocab_size, facts)
    if not parsed.all():
        i = int(np.flatnonzero(~parsed)[0])
        raise UserError(f"the task checker cannot parse prompt {i} ({np.asarray(prompts_NxP)[i].tolist()}) with "
                         f"answers of {answers_NxA.shape[1]} tokens over vocab_size={vocab_size}: "
                         f"regenerate the task data (data.task, data.task_size, data.vocab_size)")
    return check(np.asarray(prompts_NxP), np.asarray(answers_NxA), vocab_size, facts)


def _prompts(p: TaskParams, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random prompts of kind ``p.kind`` (int32 ``[n, P]``)."""
    v, c, k = p.vocab_size, num_content(p.vocab_size), p.size
    out = np.empty((n, p.prompt_len), dtype=np.int32)
    out[:, 0], out[:, -1] = marker_id(p.kind, v), sep_id(v)
    if p.kind == "lookup":
        keys = np.argsort(rng.random((n, c)), axis=1)[:, :k]  # k distinct keys per prompt
        out[:, 1:2 * k + 1:2] = keys
        out[:, 2:2 * k + 2:2] = rng.integers(0, c, (n, k))
        out[:, 2 * k + 1] = keys[np.arange(n), rng.integers(0, k, n)]
    elif p.kind == "add":
        out[:, 1] = k
        out[:, 2:4] = rng.integers(0, k, (n, 2))
    else:
        out[:, 1:k + 1] = rng.integers(0, c, (n, k))
    return out


def _rejected(p: TaskParams, prompts: np.ndarray, answers: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible wrong answer per prompt: another value of the context (lookup), an off-by-delta sum
    (add), or the correct list with one position changed (copy, reverse, sort)."""
    n, c = len(prompts), num_content(p.vocab_size)
    wrong = answers.copy()
    if p.kind == "add":
        return (answers + rng.integers(1, p.size, (n, 1))) % p.size
    rows = np.arange(n)
    col = rng.integers(0, answers.shape[1], n)
    other = (answers[rows, col] + rng.integers(1, c, n)) % c  # any content token but the right one
    if p.kind == "lookup":
        values = prompts[:, 2:2 * p.size + 2:2]
        shown_wrong = values != answers  # a random one of the prompt's other values, where there is one
        pick = values[rows, np.argmax(rng.random(values.shape) + shown_wrong, axis=1)]
        other = np.where(pick != answers[:, 0], pick, other)  # prefer a value shown in the prompt
    wrong[rows, col] = other
    return wrong


def _fact_examples(p: TaskParams, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Prompts ``marker SEP k`` over the split's keys (:mod:`entropy_jax.data.facts`) and, as the
    rejected answer, a Zipf-drawn key (:func:`entropy_jax.data.facts.wrong_values`)."""
    keys = p.key_splits()["train" if split in ("sft", "dpo", "rl") else split]
    k = fact_keys(keys, n, split.startswith("validation"), rng)
    prompts = np.stack([np.full(n, marker_id("fact", p.vocab_size)), np.full(n, sep_id(p.vocab_size)), k], 1)
    wrong = wrong_values(p.facts()[k], num_content(p.vocab_size), p.zipf_exponent, rng)
    return prompts.astype(np.int32), wrong[:, None]


def generate(p: TaskParams, split: str, n: int) -> dict[str, np.ndarray]:
    """``n`` examples of ``split``: prompt ``[n, P]``, answer and rejected ``[n, A]`` (int32).

    Splits are independent seeded streams. Raises UserError if the checker cannot parse a prompt,
    RuntimeError if it rejects a generated answer or accepts a rejected one (it is the reference).
    """
    rng = np.random.default_rng([p.seed, SPLITS.index(split), 0x7A5C])
    facts = p.facts()
    if p.kind == "fact":
        prompts, rejected = _fact_examples(p, split, n, rng)
        answers, _ = expected_answers(prompts, p.answer_len, p.vocab_size, facts)
    else:
        prompts = np.concatenate([_prompts(p, min(_CHUNK, n - s), rng) for s in range(0, n, _CHUNK)] or
                                 [np.zeros((0, p.prompt_len), np.int32)])
        answers, _ = expected_answers(prompts, p.answer_len, p.vocab_size)
        rejected = _rejected(p, prompts, answers, rng)
    rejected = rejected.astype(np.int32)
    if not (check_parsed(prompts, answers, p.vocab_size, facts).all()
            and not check(prompts, rejected, p.vocab_size, facts).any()):
        raise RuntimeError(f"task {p.kind!r}: generated answers disagree with the checker")
    return {"prompt": prompts, "answer": answers.astype(np.int32), "rejected": rejected}


def sequences(prompts_NxP: np.ndarray, answers_NxA: np.ndarray, seq_len: int, vocab_size: int) -> dict[str, np.ndarray]:
    """Prompt + answer + PAD as next-token training rows over ``seq_len`` positions.

    ``inputs``/``targets`` int32 ``[N, T]`` (tokens[:T], tokens[1:T+1]) and ``weights`` float32 ``[N, T]``,
    1 exactly where the target is an answer token (so the loss never trains on the prompt or padding).
    """
    n, p = prompts_NxP.shape
    a = answers_NxA.shape[1]
    if p + a > seq_len + 1:
        raise UserError(f"prompt ({p}) + answer ({a}) tokens do not fit train.seq_len + 1 = {seq_len + 1}; "
                         "choose a smaller data.task_size")
    tokens = np.full((n, seq_len + 1), pad_id(vocab_size), dtype=np.int32)
    tokens[:, :p], tokens[:, p:p + a] = prompts_NxP, answers_NxA
    weights = np.zeros((n, seq_len), dtype=np.float32)
    weights[:, p - 1:p + a - 1] = 1.0  # target t is token t + 1: answer tokens p .. p + a - 1
    return {"inputs": tokens[:, :seq_len], "targets": tokens[:, 1:], "weights": weights}
