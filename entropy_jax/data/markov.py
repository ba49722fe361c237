"""A sparse order-k Markov chain with a Zipf-skewed stationary distribution and its exact rate.

Construction (deterministic from the seed):

* Contexts: for order 1 the context is the last token; for order k > 1 it is
  ``last * B + (sum_i R_i[x_{t-i}] mod B)`` with ``B = CONTEXTS_PER_TOKEN`` and random tables
  ``R_i``, so the k-token state space is never materialised (a hashed representation).
* Each context row allows ``successors`` next tokens: the rank-tree edges of its last token
  (parent ``(a-1)//2``, children ``2a+1``, ``2a+2``; they make the chain irreducible) plus tokens
  drawn without replacement with probability ∝ the target Zipf weights ``w`` (Gumbel top-k).
* Row probabilities are ``softmax(theta[successors])`` with per-token log-weights ``theta`` fitted
  (iterative proportional fitting, <= 40 rounds) so the stationary unigram distribution matches
  ``w`` to ~1% (to ~10-25% for very sparse rows, e.g. successors 3-4).

The stationary distribution ``pi`` over the reachable k-token states is solved to float precision
(power iteration of the lazy chain to an L1 change below 1e-12) and the entropy rate is
``H = -sum_s pi_s sum_j P_sj ln P_sj`` nats/token (exact up to that tolerance).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import scipy.sparse as sp

CONTEXTS_PER_TOKEN = 4


@dataclasses.dataclass(frozen=True)
class MarkovChain:
    """Transition tables plus the exact stationary quantities of an order-k chain."""

    vocab_size: int
    order: int
    branches: int  # contexts per last token (1 for order 1)
    succ: np.ndarray  # [C, K] int32 allowed next tokens of each context
    cdf: np.ndarray  # [C, K] float64 cumulative transition probabilities
    hash_tables: np.ndarray  # [order - 1, V] int64 context hash tables
    states: np.ndarray  # [N] int64 reachable states, code = sum_i x_{t-i} V^i
    state_probs: np.ndarray  # [N] stationary distribution over states
    entropy_rate: float  # nats/token
    state_entropy: float  # H(x_0..x_{k-1}) under the stationary start
    unigram: np.ndarray  # [V] stationary unigram distribution
    unigram_entropy: float

    def context(self, history: np.ndarray) -> np.ndarray:
        """Context ids for histories [..., k] ordered oldest to newest."""
        ctx = history[..., -1].astype(np.int64) * self.branches
        if self.order > 1:
            h = sum(self.hash_tables[i - 1][history[..., -1 - i]] for i in range(1, self.order))
            ctx = ctx + h % self.branches
        return ctx

    def log_prob(self, tokens: np.ndarray) -> np.ndarray:
        """ln P(x_t | x_{t-k..t-1}) for t = k..L-1 of int tokens [N, L]: float64 [N, L - k].

        -inf where a transition is not allowed. The Bayes-optimal loss of those targets.
        """
        k = tokens.shape[1]
        hist = np.stack([tokens[:, t - self.order : t] for t in range(self.order, k)], axis=1)
        ctx = self.context(hist)
        probs = np.diff(self.cdf, axis=1, prepend=0.0)[ctx]
        p = np.where(self.succ[ctx] == tokens[:, self.order :, None], probs, 0.0).sum(axis=-1)
        with np.errstate(divide="ignore"):
            return np.log(p)

    def sample(self, num: int, length: int, rng: np.random.Generator) -> np.ndarray:
        """int32 [num, length] sequences started from the stationary state distribution."""
        k = self.order
        start = np.searchsorted(np.cumsum(self.state_probs), rng.random(num) * self.state_probs.sum())
        codes = self.states[np.minimum(start, self.states.size - 1)]
        out = np.empty((num, max(length, k)), dtype=np.int32)
        for i in range(k):  # digit 0 is the newest token
            out[:, k - 1 - i] = (codes // self.vocab_size**i) % self.vocab_size
        for t in range(k, length):
            ctx = self.context(out[:, t - k : t])
            u = rng.random((num, 1))
            idx = np.minimum((u > self.cdf[ctx]).sum(axis=1), self.cdf.shape[1] - 1)
            out[:, t] = self.succ[ctx, idx]
        return out[:, :length]


def _row_successors(w: np.ndarray, last: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[C, k] successors per row: the tree edges of ``last`` forced in, the rest Gumbel top-k ∝ w.

    Forced edges link token a to its parent (a - 1) // 2 and children 2a + 1, 2a + 2 in rank
    order, so every token reaches every other one (irreducible) through more frequent tokens.
    """
    v = w.size
    rows = []
    for chunk in np.array_split(np.arange(last.size), max(1, last.size * v // 2**22)):
        g = np.log(w)[None, :] + rng.gumbel(size=(chunk.size, v))
        a = last[chunk]
        i = np.arange(chunk.size)
        g[i[a > 0], (a[a > 0] - 1) // 2] = np.inf
        for child in (2 * a + 1, 2 * a + 2):
            g[i[child < v], child[child < v]] = np.inf
        rows.append(np.argpartition(-g, k - 1, axis=1)[:, :k])
    return np.concatenate(rows).astype(np.int32)


def _decode(codes: np.ndarray, v: int, k: int) -> np.ndarray:
    """[N, k] tokens, oldest first, of state codes."""
    return np.stack([(codes // v ** (k - 1 - j)) % v for j in range(k)], axis=-1)


def _candidate_states(succ: np.ndarray, v: int, k: int, branches: int) -> np.ndarray:
    """Sorted codes of a transition-closed superset of the reachable k-token states.

    Tuples whose consecutive tokens are each allowed by some context of the previous token;
    unreachable (transient) members get stationary probability 0.
    """
    allowed = succ.reshape(v, -1)  # every successor of any context of each last token
    codes = np.arange(v, dtype=np.int64)
    for _ in range(k - 1):
        nxt = codes[:, None] * v + allowed[codes % v]
        codes = np.unique(nxt.ravel())
    return codes


def _transition_matrix(chain: MarkovChain, probs: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """Sparse P over ``chain.states`` and the context id of each state."""
    v, k, states = chain.vocab_size, chain.order, chain.states
    ctx = chain.context(_decode(states, v, k))
    cols = np.searchsorted(states, (states[:, None] * v + chain.succ[ctx]) % v**k)
    n, m = states.size, chain.succ.shape[1]
    p = sp.csr_matrix((probs[ctx].ravel(), (np.repeat(np.arange(n), m), cols.ravel())), shape=(n, n))
    return p, ctx


def _stationary(p: sp.csr_matrix, pi: np.ndarray, tol: float, max_iter: int = 100_000) -> np.ndarray:
    """Power iteration of the lazy chain (I + P) / 2 (same pi, aperiodic) to L1 change < tol."""
    pt = p.T.tocsr()
    for _ in range(max_iter):
        new = 0.5 * (pi + pt @ pi)
        new /= new.sum()
        if np.abs(new - pi).sum() < tol:
            return new
        pi = new
    raise RuntimeError("stationary distribution did not converge; the chain mixes too slowly")


def _entropy(p: np.ndarray, axis: int | None = None) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


def _softmax_rows(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def build_chain(
    vocab_size: int, order: int, successors: int, exponent: float, seed: int, stream: int = 0
) -> MarkovChain:
    """Build the chain described in the module docstring and solve its stationary quantities.

    ``stream`` gives independent chains from one seed (the topics of a mixture).
    """
    if not 1 <= order <= 3:
        raise ValueError(f"order must be 1, 2 or 3, got {order}")
    if not 3 <= successors <= vocab_size:
        raise ValueError(f"successors must be in 3..vocab_size={vocab_size}, got {successors}")
    rng = np.random.default_rng([seed, order, vocab_size, successors, stream])
    w = np.arange(1, vocab_size + 1, dtype=np.float64) ** -float(exponent)
    w /= w.sum()
    branches = 1 if order == 1 else CONTEXTS_PER_TOKEN
    succ = _row_successors(w, np.repeat(np.arange(vocab_size), branches), successors, rng)
    tables = rng.integers(0, 2**20, size=(max(order - 1, 0), vocab_size))
    states = _candidate_states(succ, vocab_size, order, branches)
    if states.size > 2_000_000:
        raise ValueError(f"{states.size} states: lower order, vocab_size or successors")
    empty = np.zeros(0)
    chain = MarkovChain(vocab_size, order, branches, succ, empty, tables, states, empty, 0.0, 0.0,
                        empty, 0.0)
    probs, pi = _fit_rows(chain, w)
    return _finish(chain, probs, pi)


def _fit_rows(chain: MarkovChain, w: np.ndarray, iters: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Row probabilities softmax(theta[succ]) with theta fitted so the unigram pi matches w.

    Iterative proportional fitting on log-column weights (damped); stops at 1% max log error.
    """
    v = chain.vocab_size
    counts = np.bincount(chain.succ.ravel(), minlength=v)
    theta = np.log(w) - np.log(counts)
    pi = np.full(chain.states.size, 1.0 / chain.states.size)
    for _ in range(iters):
        probs = _softmax_rows(theta[chain.succ])
        p, _ = _transition_matrix(chain, probs)
        pi = _stationary(p, pi, tol=1e-9)
        unigram = np.bincount(chain.states % v, weights=pi, minlength=v)
        err = np.log(w) - np.log(np.maximum(unigram, 1e-300))
        if np.abs(err).max() < 0.01:
            break
        theta += 0.7 * err
    return _softmax_rows(theta[chain.succ]), pi


def _finish(chain: MarkovChain, probs: np.ndarray, pi: np.ndarray) -> MarkovChain:
    """Exact stationary distribution (to float precision) and the entropy rate."""
    p, ctx = _transition_matrix(chain, probs)
    pi = _stationary(p, pi, tol=1e-12)
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    unigram = np.bincount(chain.states % chain.vocab_size, weights=pi, minlength=chain.vocab_size)
    return dataclasses.replace(
        chain, cdf=cdf, state_probs=pi, entropy_rate=float(pi @ _entropy(probs[ctx], axis=1)),
        state_entropy=float(_entropy(pi)), unigram=unigram, unigram_entropy=float(_entropy(unigram)),
    )
