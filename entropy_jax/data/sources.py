"""Synthetic token sources with exactly known entropy rates (numpy, vectorised, seeded).

Three members, all in nats per token:

* ``MarkovSource``: an order-k chain over ``V`` tokens with ``K`` successors per context, built
  so that its stationary unigram distribution is Zipf-skewed (token id = frequency rank). Its
  entropy rate ``H = -sum_s pi_s sum_j P_sj ln P_sj`` is computed from the exact stationary
  distribution ``pi`` over the reachable k-token states.
* ``mixture_entropy_bounds``: a mixture of M chains, one latent topic per sequence.
* ``AssocPairsSource``: (filler, a1, f(a1), a2, f(a2), ...) with Zipf keys and a fixed permutation f.

``uniform=True`` (Zipf exponent 0) gives the uniform-frequency control of each member.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from entropy_jax.data.markov import MarkovChain, build_chain


def zipf_weights(vocab_size: int, exponent: float) -> np.ndarray:
    """Normalised Zipf probabilities ``p_r ∝ (r + 1)^-exponent`` for ranks r = 0..V-1."""
    w = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(exponent)
    return w / w.sum()


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in nats of a probability vector (zeros ignored)."""
    p = np.asarray(p, dtype=np.float64)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class MarkovSource:
    """Order-k Zipf Markov chain: ``sample(n, length, rng)`` -> int32 [n, length]."""

    vocab_size: int
    order: int = 1
    successors: int = 8
    zipf_exponent: float = 1.1
    seed: int = 0
    topic: int = 0  # independent chains from one seed

    @property
    def chain(self) -> MarkovChain:
        """The transition tables and exact stationary quantities (built once per instance)."""
        # Cached on the instance: building the chain is the only expensive part.
        cached = self.__dict__.get("_chain")
        if cached is None:
            cached = build_chain(
                self.vocab_size, self.order, self.successors, self.zipf_exponent, self.seed, self.topic
            )
            object.__setattr__(self, "_chain", cached)
        return cached

    @property
    def entropy_rate(self) -> float:
        """The source's entropy rate (nats/token); targets at positions < order carry more."""
        return self.chain.entropy_rate

    def per_target_optimum(self, seq_len: int) -> float:
        """Bayes-optimal mean loss over targets x_1..x_T given x_0..x_{t-1} (stationary start).

        ``(H(x_0..x_{k-1}) - H(x_0) + (T - k + 1) H) / T`` for order k; equals H for k = 1.
        """
        c = self.chain
        k = self.order
        return (c.state_entropy - c.unigram_entropy + (seq_len - k + 1) * c.entropy_rate) / seq_len

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """int32 [num, length] sequences from the stationary start."""
        return self.chain.sample(num, length, rng)


def mixture_entropy_bounds(optima: list[float], seq_len: int) -> tuple[float, float]:
    """Per-token optimum of a uniform mixture of M stationary chains, one topic per sequence.

    With ``h_m`` the per-target optimum of chain m over T targets (its entropy rate for order 1),
    the mixture's optimum ``(1/T) H(x_1..x_T | x_0)`` lies in ``[mean(h_m), mean(h_m) + ln(M)/T]``:
    knowing the topic lowers it by ``(I(x_0..x_T; z) - I(x_0; z)) / T <= ln(M) / T``.
    """
    mean = float(np.mean(optima))
    return mean, mean + float(np.log(len(optima))) / seq_len


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """M independent Markov chains; each sequence draws one topic uniformly and keeps it."""

    chains: tuple[MarkovSource, ...]

    def bounds(self, seq_len: int) -> tuple[float, float]:
        """(lower, upper) per-token optimum over seq_len targets; see mixture_entropy_bounds."""
        return mixture_entropy_bounds([c.per_target_optimum(seq_len) for c in self.chains], seq_len)

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """int32 [num, length]: one uniformly drawn topic per sequence, kept throughout."""
        topics = rng.integers(len(self.chains), size=num)
        out = np.empty((num, length), dtype=np.int32)
        for m, chain in enumerate(self.chains):
            rows = np.flatnonzero(topics == m)
            if rows.size:
                out[rows] = chain.sample(rows.size, length, rng)
        return out


@dataclasses.dataclass(frozen=True)
class AssocPairsSource:
    """Sequences (filler, a1, f(a1), ..., a_n, f(a_n)) of length 1 + 2n.

    Keys are i.i.d. Zipf(exponent) over the vocabulary (token id = rank), f is a fixed random
    permutation drawn from ``seed``, the filler is uniform. With inputs = tokens[:T] and
    targets = tokens[1:T+1] (T = 2n) the last input is always a key.
    """

    vocab_size: int
    zipf_exponent: float = 1.2
    seed: int = 0

    @property
    def permutation(self) -> np.ndarray:
        """The fixed answer map f (int32 [V]), drawn from the seed."""
        return np.random.default_rng([self.seed, 7]).permutation(self.vocab_size).astype(np.int32)

    @property
    def key_entropy(self) -> float:
        """H(keys) in nats: the entropy of the key distribution."""
        return entropy(zipf_weights(self.vocab_size, self.zipf_exponent))

    def per_target_optimum(self, seq_len: int) -> float:
        """``(#key targets / T) H(keys) = H(keys) / 2`` for even T: values are deterministic."""
        if seq_len % 2:
            raise ValueError(f"assoc_pairs needs an even sequence length, got {seq_len}")
        return (seq_len // 2) / seq_len * self.key_entropy

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """int32 [num, length] with length = 1 + 2n: filler, then n (key, f(key)) pairs."""
        if length % 2 != 1:
            raise ValueError(f"assoc_pairs stores 1 + 2n tokens, got length {length}")
        cdf = np.cumsum(zipf_weights(self.vocab_size, self.zipf_exponent))
        keys = np.searchsorted(cdf, rng.random((num, length // 2)) * cdf[-1], side="right")
        keys = np.minimum(keys, self.vocab_size - 1).astype(np.int32)
        out = np.empty((num, length), dtype=np.int32)
        out[:, 0] = rng.integers(self.vocab_size, size=num)
        out[:, 1::2] = keys
        out[:, 2::2] = self.permutation[keys]
        return out
