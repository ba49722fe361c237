"""The associative-pairs corpus's key -> value facts, split for fine-tuning by key frequency.

The ``assoc_pairs`` pretraining corpus (:class:`entropy_jax.data.sources.AssocPairsSource`) shows
keys i.i.d. Zipf(s) over ``V`` token ids (id = frequency rank) each followed by its value ``f(k)``,
``f`` a fixed permutation drawn from the corpus seed. The ``fact`` task asks those facts outside
their pretraining context, so fine-tuning teaches a format and draws on knowledge pretraining put
into the model. Keys are split by rank (all splits hold only content keys whose value is a content
token, so no answer is a reserved id):

* in distribution: ranks ``[0, in_dist)``, the frequent keys; a seeded draw of ``heldout`` of them
  is the held-out ``validation`` split, the rest are the training keys of the sft / dpo / rl streams;
* out of distribution (``validation_ood``): the ``heldout`` rarest eligible ranks of
  ``[in_dist, V - NUM_SPECIAL)`` (all of them if fewer), the Zipf tail, each rarer in pretraining
  than any in-distribution key. Both held-out splits so hold the same number of keys.

No held-out key (in or out of distribution) is ever a training key.
"""

from __future__ import annotations

import numpy as np

from entropy_jax.data.sources import AssocPairsSource, zipf_weights
from entropy_jax.errors import UserError


def fact_table(vocab_size: int, zipf_exponent: float, corpus_seed: int) -> np.ndarray:
    """``f`` of the assoc_pairs corpus of these parameters: int32 ``[V]``, ``f[k]`` the value of key ``k``."""
    return AssocPairsSource(vocab_size, zipf_exponent, corpus_seed).permutation


def eligible_keys(facts_V: np.ndarray, num_content: int) -> np.ndarray:
    """The content keys whose value is a content token, ascending."""
    return np.flatnonzero(facts_V[:num_content] < num_content).astype(np.int32)


def key_splits(facts_V: np.ndarray, num_content: int, in_dist: int, heldout: int, seed: int) -> dict[str, np.ndarray]:
    """Keys (int32, ascending rank) of ``train``, ``validation`` (held out, in distribution) and
    ``validation_ood`` (the tail); see the module docstring. Raises UserError when a split is empty."""
    eligible = eligible_keys(facts_V, num_content)
    frequent, tail = eligible[eligible < in_dist], eligible[eligible >= in_dist]
    if not 1 <= heldout < len(frequent) or not len(tail):
        raise UserError(f"data.task='fact' with data.task_size={in_dist} has {len(frequent)} in-distribution and "
                        f"{len(tail)} tail keys; data.heldout_keys={heldout} must leave at least one training key "
                        f"and the tail must hold one: choose a task_size in ({heldout}, {num_content})")
    held = np.sort(np.random.default_rng([seed, 0xFAC7]).choice(frequent, heldout, replace=False))
    train, tail = np.setdiff1d(frequent, held), tail[-heldout:]
    splits = {"train": train, "validation": held, "validation_ood": tail}
    return {k: v.astype(np.int32) for k, v in splits.items()}


def fact_keys(split_keys: np.ndarray, n: int, cycle: bool, rng: np.random.Generator) -> np.ndarray:
    """``n`` keys of a split: uniform draws (training streams, every training key equally taught) or,
    ``cycle``, every key once in a seeded order, then again (held-out splits: any first ``len(keys)``
    rows are distinct prompts, and ``n`` a multiple of it weighs every key alike)."""
    if cycle:
        return np.resize(rng.permutation(split_keys), n)
    return rng.choice(split_keys, n)


def wrong_values(answers_N: np.ndarray, num_content: int, zipf_exponent: float, rng: np.random.Generator) -> np.ndarray:
    """A wrong answer per prompt: a key drawn from the corpus's Zipf law (over content ids, redrawn as
    the next id where it is the right answer), i.e. what the pretraining stream would continue with
    at a value position, and the value of another key (``f`` is a permutation).

    Values of random other keys were tried first: DPO then learns pair-specific pushes that do not
    carry over to held-out prompts (held-out reward accuracy 0.68-0.71 against 0.94-0.99 on its
    training pairs); a wrong answer drawn from one law for every prompt is one the preference can
    learn once for all keys."""
    w = zipf_weights(num_content, zipf_exponent)
    wrong = rng.choice(num_content, len(answers_N), p=w).astype(np.int32)
    return np.where(wrong == answers_N, (wrong + 1) % num_content, wrong)
