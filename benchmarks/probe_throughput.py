"""Probe throughput and memory against plain numpy float64 baselines, measured in one run.

  python benchmarks/probe_throughput.py            # full table (several minutes: official DSE at 10k)
  python benchmarks/probe_throughput.py --quick    # reduced sizes (about 1.5 CPU minutes)

Threads are pinned to ``--threads`` (default 1) for BLAS and XLA before anything is imported,
so the ratios compare algorithms, not core counts. Baselines:
  (a) Tracing paper: full SVD of the centred matrix (as scikit-learn's PCA 'full' solver does,
      U, S, Vt), once for RankMe and again for alpha.
  (b) covariance + eigh: ``Xc^T Xc`` and ``eigvalsh`` (the Tracing metrics only);
  (b+) the same for every output of spectral_metrics (centred and uncentred: two of each).
  DSE: the official algorithm written densely (distance matrix, Gaussian, dense diagonal
      degree matrix, two N x N products, ``np.linalg.eigvalsh``).
Prints one Markdown table: each row times our computation and its named baseline in the same
run (median of 3 calls and their spread; one call when a call takes over 30 s), their ratio, and
how far the results agree. "MiB" is peak resident memory above the level just before the call
(sampled every 5 ms), except for attention entropy, where it is XLA's compiled buffer size.

Measured 2026-11-28, one thread, 2-core VM shared with other jobs (load ~3-5):
  15000x2048: ours 2.31 s, (a) 25.9 s (11.2x), (b) 2.04 s (0.88x), (b+) 3.97 s (1.72x), rel diff 1e-13
  15000x2048 with the two-stage tridiagonalisation (three runs): ours 1.75-1.94 s, (a) 28.9-30.6 s
      (15.7-16.5x), (b) 1.89-2.60 s (1.00-1.34x), (b+) 3.55-4.58 s (1.89-2.36x), rel diff 1e-13
  DSE N=10k: ours 51.9 s / 839 MiB, official 189.5 s / 3827 MiB (3.65x), |diff| 0 bits
  attention entropy T=8192: dense 512 MiB, blocked (512 keys) 34 MiB
  attention bounds, 2026-11-29, load ~15: small preset at init, 32 x 256 tokens: exact 206 s,
      certified 2.93 s (70x); tiny run step 3000 (--attention-workdir), 128 x 64: exact 31.0 s,
      certified 0.99 s (31x); s certified / exact: logits mean 1.0007 worst 1.0092, weights 1.0001
  DSE estimate (SLQ) vs exact, 2026-11-29, 2-core VM under load 12-19 (wall times inflated):
      LayerNorm-like D=32, N=5000: median sigma exact 3.18272 / slq 3.16876 bits (-0.44%, stderr
      0.013), exact 453 s / slq 84 s; sigma 10: 0.15509 / 0.15506 (-0.02%); N=10000 median sigma:
      exact 3.18333 / slq 3.17025 (-0.41%, stderr 0.016), exact 812 s, 825 MiB / slq 170 s, 85 MiB;
      sigma 10: exact 0.13315 / slq 0.13323 (+0.06%), exact 442 s / slq 114 s;
      Gaussian D=128, N=10000, sigma 10: exact 8.73957 / slq 8.71732 (-0.25%, stderr 0.043), slq 58 CPU s;
      N=50000 D=32: one kernel pass 24 CPU s (35 per estimate), peak RSS 0.5 GB
"""

from __future__ import annotations

import argparse
import os
import sys


def _pin_threads(n: int) -> None:
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    if n == 1:
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        )


if __name__ == "__main__":
    _pin_threads(int(next((a.split("=")[1] for a in sys.argv if a.startswith("--threads=")), "1")))

import dataclasses  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import scipy.linalg  # noqa: E402
from tqdm import tqdm  # noqa: E402

from entropy_jax import probes  # noqa: E402
from entropy_jax.probes import diffusion_slq  # noqa: E402


def measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """(result, seconds, extra peak RSS in MiB) of one call."""
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return out, seconds, (max(peak[0], proc.memory_info().rss) - base) / 2**20


@dataclasses.dataclass
class Timing:
    """Median and spread of up to three calls (one when a call takes longer than ``REPEAT_BELOW_S``)."""

    result: Any
    seconds: list[float]
    mib: float

    @property
    def median(self) -> float:
        return float(np.median(self.seconds))

    def __str__(self) -> str:
        if len(self.seconds) == 1:
            return f"{self.seconds[0]:.2f} (1 run)"
        return f"{self.median:.2f} [{min(self.seconds):.2f}-{max(self.seconds):.2f}]"


REPEAT_BELOW_S = 30.0


def timed(fn: Callable[[], Any], repeats: int = 3) -> Timing:
    """Call ``fn`` up to ``repeats`` times (once if the first call takes over REPEAT_BELOW_S)."""
    out, seconds, mib = measure(fn)
    runs = [seconds]
    while len(runs) < repeats and seconds < REPEAT_BELOW_S:
        _, seconds, more = measure(fn)
        runs.append(seconds)
        mib = max(mib, more)
    return Timing(out, runs, mib)


@dataclasses.dataclass
class Row:
    """One line of the table: our computation against a named baseline, both measured here."""

    case: str
    size: str
    ours: Timing
    baseline: str = ""
    base: Timing | None = None
    agreement: str = ""

    def cells(self) -> list[str]:
        ratio = f"{self.base.median / self.ours.median:.2f}x" if self.base else ""
        return [self.case, self.size, str(self.ours), self.baseline, str(self.base) if self.base else "skipped",
                ratio, f"{self.ours.mib:.0f}", f"{self.base.mib:.0f}" if self.base else "", self.agreement]


COLUMNS = ["case", "size", "ours s (median [spread])", "baseline", "baseline s", "baseline / ours",
           "ours MiB", "baseline MiB", "agreement"]


def print_table(rows: list[Row]) -> None:
    """The one table (Markdown): every row's ratio compares two timings taken in this run."""
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row.cells()) + " |")


def _entropy_rank(p: np.ndarray) -> float:
    return float(np.exp(-np.sum(p * np.log(p))))


def _alpha(ev: np.ndarray, start: int = 11, stop: int = 100) -> float:
    r = np.arange(start, stop) + 1
    a = np.stack([-np.log(r), np.ones(len(r))], 1)
    w = (1.0 / r.astype(np.float32))[:, None]
    return float(np.linalg.solve(a.T @ (a * w), (a * w).T @ np.log(ev[start:stop]))[0])


def tracing_svd_baseline(x: np.ndarray) -> dict[str, float]:
    """(a) sklearn-PCA-style full SVD of the centred matrix, separately for RankMe and alpha."""
    out = {}
    for key in ("rankme_cov", "alpha_req"):
        xc = x - x.mean(0)
        _, s, _ = scipy.linalg.svd(xc, full_matrices=False)
        ev = (s**2 / (len(x) - 1))[:2048]
        ev = ev / ev.sum()
        out[key] = _entropy_rank(ev / np.abs(ev).sum() + 1e-7) if key == "rankme_cov" else _alpha(ev)
    return out


def covariance_baseline(x: np.ndarray, both: bool) -> dict[str, float]:
    """(b) covariance + eigvalsh for the Tracing metrics; (b+) also the uncentred Gram."""
    xc = x - x.mean(0)
    ev = np.clip(np.linalg.eigvalsh(xc.T @ xc)[::-1], 0, None)
    lam = ev / ev.sum()
    out = {"rankme_cov": _entropy_rank(lam + 1e-7), "alpha_req": _alpha(ev)}
    if both:
        out["von_neumann_entropy"] = float(-np.sum(lam * np.log(lam)))
        g = np.clip(np.linalg.eigvalsh(x.T @ x)[::-1], 0, None)
        s = np.sqrt(g)
        out["rankme"] = _entropy_rank(s / s.sum() + 1e-7)
    return out


def official_dse(x: np.ndarray, sigma: float = 10.0, t: int = 1) -> float:
    """The official DSE algorithm as written (dense N x N intermediates, two products)."""
    sq = (x * x).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    g = np.exp(-(dist**2) / (2 * sigma**2))
    deg = np.diag(1 / np.sum(g, axis=1) ** 0.5)
    lam = np.abs(np.linalg.eigvalsh(deg @ g @ deg)) ** t
    p = lam / lam.sum() + np.finfo(float).eps
    return float(-np.sum(p * np.log2(p)))


def _max_rel(ours: dict, base: dict) -> float:
    return max(abs(ours[k] - v) / abs(v) for k, v in base.items())


def spectral_rows(sizes: list[tuple[int, int]], mesh: Any) -> list[Row]:
    """spectral_metrics (every spectral output) against (a), (b) and (b+)."""
    rows = []
    for n, d in sizes:
        x = np.random.default_rng(0).standard_normal((n, d)) * np.arange(1, d + 1) ** -0.6 + 3.0
        probes.spectral_metrics(x[: n // 2], mesh=mesh)  # compile other shapes' kernels off the clock
        probes.spectral_metrics(x, mesh=mesh)
        ours = timed(lambda x=x: probes.spectral_metrics(x, mesh=mesh))
        for name, fn in (("(a) full SVD x2", tracing_svd_baseline),
                         ("(b) cov + eigvalsh", lambda x: covariance_baseline(x, both=False)),
                         ("(b+) (b) for every output", lambda x: covariance_baseline(x, both=True))):
            base = timed(lambda x=x, fn=fn: fn(x))
            rows.append(Row("spectral_metrics", f"{n} x {d}", ours, name, base,
                            f"max rel diff {_max_rel(ours.result, base.result):.1e}"))
    return rows


def dse_rows(sizes: list[int], official_up_to: int) -> list[Row]:
    """Exact DSE (sigma 10, D = 128) against the official algorithm written densely."""
    rows = []
    for n in sizes:
        x = np.random.default_rng(1).standard_normal((n, 128))
        ours = timed(lambda x=x: probes.diffusion_spectral_entropy(x, 10.0))
        base = timed(lambda x=x: official_dse(x, 10.0)) if n <= official_up_to else None
        agree = f"|diff| {abs(ours.result - base.result):.1e} bits" if base else f"{ours.result:.5f} bits"
        rows.append(Row("DSE exact, sigma 10", f"N {n}, D 128", ours, "official (dense)", base, agree))
    return rows


def layernorm_like(n: int, d: int, seed: int = 0) -> np.ndarray:
    """Rows of a power-law Gaussian (rotated, offset) after LayerNorm: centred, unit variance per row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.arange(1, d + 1) ** -0.8 @ np.linalg.qr(rng.standard_normal((d, d)))[0]
    x += rng.standard_normal(d)
    return (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True)


def dse_estimate_rows(sizes: list[int], exact_up_to: int, d: int = 32) -> list[Row]:
    """Matrix-free DSE (SLQ) against the exact dense DSE (the baseline), on LayerNorm-like rows at
    the median-distance bandwidth (the sweep's ``dse_bits``) and at sigma = 10 (``dse_bits_sigma10``)."""
    rows = []
    for n in sizes:
        x = layernorm_like(n, d)
        for label, sigma in (("median", probes.diffusion.median_distance(x)), ("10", 10.0)):
            ours = timed(lambda x=x, s=sigma: diffusion_slq.diffusion_spectral_entropy_slq(x, s), repeats=1)
            base = None
            if n <= exact_up_to:
                base = timed(lambda x=x, s=sigma: probes.diffusion_spectral_entropy(x, s, max_samples=None), repeats=1)
            est = ours.result
            agree = f"{est.bits:.5f} bits, stderr {est.stderr:.5f}, half-gap {est.quadrature_halfgap:.5f}"
            if base:
                agree = f"rel diff {(est.bits - base.result) / base.result:+.4f}; " + agree
            rows.append(Row(f"DSE estimate (SLQ), sigma {label}", f"N {n}, D {d}", ours, "exact (dense)", base,
                            agree))
    return rows


def attention_memory(t: int, key_block: int = 512, dh: int = 64) -> list[Row]:
    """Blocked attention entropy (online logsumexp) against dense T x T logits, one causal head,
    float32; the MiB columns here are XLA's compiled temp + output memory, not resident memory."""
    q = jax.ShapeDtypeStruct((1, 1, t, dh), jnp.float32)

    def dense(q: jax.Array, k: jax.Array) -> jax.Array:
        return probes.attention_entropy(jnp.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(dh), causal=True)["row"]

    def blocked(q: jax.Array, k: jax.Array) -> jax.Array:
        return probes.attention_entropy_blocked(q, k, causal=True, key_block=key_block)["row"]

    rng = np.random.default_rng(2)
    args = [jnp.asarray(rng.standard_normal((1, 1, t, dh)), jnp.float32) for _ in range(2)]
    runs = {}
    for name, fn in (("dense", dense), ("blocked", blocked)):
        compiled = jax.jit(fn).lower(q, q).compile()
        stats = compiled.memory_analysis()
        runs[name] = timed(lambda c=compiled: np.asarray(c(*args)))
        runs[name].mib = (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20
    diff = np.nanmax(np.abs(runs["blocked"].result - runs["dense"].result))
    return [Row(f"attention entropy, blocked ({key_block} keys)", f"T {t}, 1 head", runs["blocked"],
                "dense T x T logits", runs["dense"], f"max |diff| {diff:.1e} nats (MiB: compiled)")]


def _attention_model(workdir: str | None, num_examples: int) -> tuple[Any, tuple, np.ndarray, str]:
    """(graphdef, (params, model_state), tokens, label): a run's latest checkpoint and probe
    sequences, or the ``small`` preset at initialisation on random tokens."""
    import ml_collections

    from entropy_jax import data
    from entropy_jax.checkpoint import Checkpoints
    from entropy_jax.models import ModelConfig, abstract_model, init_model, model_config
    from entropy_jax.sharding import make_mesh

    if workdir is None:
        from entropy_jax.cli import load_config_file

        cfg = load_config_file(f"{Path(__file__).parents[1] / 'experiments/configs/pretrain.py'}:small")
        graphdef, params, model_state = init_model(model_config(cfg.model.to_dict(), cfg.data.vocab_size,
                                                                cfg.train.seq_len), 0)
        tokens = np.random.default_rng(3).integers(0, cfg.data.vocab_size, (num_examples, cfg.train.seq_len))
        return graphdef, (params, model_state), tokens.astype(np.int32), "small preset at init"
    with Checkpoints(workdir, read_only=True) as ckpts:
        step = ckpts.all_steps()[-1]
        meta = ckpts.read_meta(step)
        graphdef, params, model_state = abstract_model(ModelConfig(**meta["model_config"]), make_mesh())
        r = ckpts.restore(step, arrays={"params": params, "model_state": model_state})
    cfg = ml_collections.ConfigDict(meta["config"])
    tokens = data.probe_set(data.load_corpus(cfg.data, cfg.train.seq_len), cfg.probe_set.num_sequences)[0]
    return graphdef, (r["params"], r["model_state"]), tokens[:num_examples], f"{workdir} step {step}"


def attention_bound_rows(workdir: str | None, num_examples: int) -> list[Row]:
    """Theorem 3.1 bounds with exact vs certified spectral norms: the sweep's attention pass
    (median of 3 and spread, same run) and the looseness of s and of the row-mean bounds."""
    import functools

    from flax import nnx

    from entropy_jax.probes.matrix_norms import spectral_norm_upper_bound
    from entropy_jax.sharding import make_mesh
    from entropy_jax.sweep import forward

    graphdef, state, tokens, label = _attention_model(workdir, num_examples)

    @functools.partial(jax.jit, static_argnums=(0, 3))
    def stats(graphdef: Any, state: tuple, tokens: jax.Array, norm: str) -> tuple[dict, dict]:
        model = nnx.merge(graphdef, *state)
        _, inter = model(tokens, return_intermediates=True)
        return forward._attention_stats(model, inter, norm), inter

    mesh = make_mesh()
    runs = {}
    for norm in ("exact", "certified"):
        fn = lambda g, s, t, norm=norm: stats(g, s, t, norm)[0]
        forward._batched(fn, graphdef, state, tokens[: len(tokens) // 2 or 1], mesh, len(tokens))  # compile
        runs[norm] = timed(lambda fn=fn: forward._batched(fn, graphdef, state, tokens, mesh, len(tokens)))
    looseness = []
    _, inter = jax.device_get(stats(graphdef, state, tokens[:16], "exact"))
    t = tokens.shape[1]
    z = np.concatenate([np.where(np.tril(np.ones((t, t), bool)), a, 0.0).reshape(-1, t, t)
                        for a in inter["attention_logits"]]).astype(np.float32)
    x = np.concatenate(inter["attention_inputs"]).astype(np.float32)
    for name, mats, power in (("s_logits", z, 1), ("s_weights", x, 2)):  # s_weights = ||W_K W_Q^T|| ||X||^2
        bound = np.asarray(jax.jit(jax.vmap(spectral_norm_upper_bound))(mats))
        ratio = (bound / np.linalg.norm(mats.astype(np.float64), 2, axis=(1, 2))) ** power
        looseness.append(f"{name} certified / exact mean {ratio.mean():.4f} worst {ratio.max():.4f}")
    for name in ("logits", "weights"):
        key = f"attention/attention_entropy_bound_{name}"
        c, e = runs["certified"].result[key], runs["exact"].result[key]
        r = c[e > 0] / e[e > 0]
        looseness.append(f"bound_{name} certified / exact mean {r.mean():.4f} worst {r.min():.4f}" if r.size
                         else f"bound_{name}: every exact bound is 0")
    return [Row("attention bounds, certified norms", f"{label}: {tokens.shape[0]} x {tokens.shape[1]} tokens",
                runs["certified"], "exact SVD per head", runs["exact"], "; ".join(looseness))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced sizes (about 1.5 CPU minutes)")
    parser.add_argument("--threads", type=int, default=1, help="BLAS/XLA threads (set before import)")
    parser.add_argument("--mesh", action="store_true", help="shard spectral_metrics over all devices")
    parser.add_argument("--attention-workdir", default=None,
                        help="attention bounds on this run's latest checkpoint (default: small preset at init)")
    args = parser.parse_args()
    mesh = None
    if args.mesh:
        from entropy_jax.sharding import make_mesh

        mesh = make_mesh()
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}, threads: {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.quick:
        sections = [lambda: spectral_rows([(2000, 128), (10_000, 512)], mesh),
                    lambda: dse_rows([1000, 2000], official_up_to=2000),
                    lambda: dse_estimate_rows([2000], exact_up_to=2000),
                    lambda: attention_memory(2048),
                    lambda: attention_bound_rows(args.attention_workdir, 16)]
    else:
        sections = [lambda: spectral_rows([(2000, 128), (10_000, 512), (15_000, 2048)], mesh),
                    lambda: dse_rows([1000, 2000, 5000, 10_000], official_up_to=10_000),
                    lambda: dse_estimate_rows([5000, 10_000, 50_000], exact_up_to=10_000),
                    lambda: attention_memory(8192),
                    lambda: attention_bound_rows(args.attention_workdir, 128)]
    rows = []
    for section in tqdm(sections, desc="benchmark sections", file=sys.stderr):
        rows += section()
    print_table(rows)

if __name__ == "__main__":
    main()
