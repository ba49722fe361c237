"""Train-step throughput (tokens/s) and model-FLOPs utilisation for a named shape, against nanoGPT.

  python benchmarks/train_throughput.py                      # reference shape + the nanoGPT peer (CPU)
  python benchmarks/train_throughput.py --shape=tiny --peer=true --steps_per_call=8   # the demo's own loop
  python benchmarks/train_throughput.py --shape=tiny --peer=false
  python benchmarks/train_throughput.py --shape=gpt2-small --dtype=bfloat16 --loss_chunk=128   # a GPU
  python benchmarks/train_throughput.py --profile_dir=/tmp/trace   # also a jax.profiler trace of 3 steps

Prints one Markdown table: a row for entropy_jax and, with the peer, a row for nanoGPT
(benchmarks/nanogpt_peer.py, PyTorch eager) timed in the same run, repeats interleaved, with the
ratio entropy_jax / nanoGPT in tokens/s. ``--gemm_floor`` adds a row for the step's matrix
products alone (forward and both backward products of every projection, attention in the model's
query blocks, the unembedding), each jitted and timed by itself in XLA and summed: the time a step
would take if everything but its GEMMs were free. Figures are the median of ``--repeats`` (3) timings of
``--steps`` steps each, with the spread (min-max) of the repeats. The peer runs by default on the
reference shape on CPU when PyTorch is installed.

The reference and gpt2-small shapes are configured like the peer (tied embeddings, no biases in
the projections, exact GELU; entropy_jax's LayerNorms keep their bias, 2 d per block), so both do
the same work; tiny and small are the pretrain presets' models. MFU = model FLOPs/s / peak
FLOPs/s, with model FLOPs per token 6 N (N: the parameters used in matmuls, i.e. without the
position table and, when untied, the input-embedding table; forward + backward) + 12 L T d
(attention scores and mixing, causal mask not discounted, as PaLM's appendix B counts). The
peak is the device's dense datasheet figure for the compute dtype when known (bfloat16, or TF32
for float32 matmuls on GPUs), else a float32 matmul measured in the same run on the same devices
(on CPU the ratio is "fraction of achievable matmul throughput").
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from entropy_jax.models import ModelConfig, init_model
from entropy_jax.models.attention import default_query_block
from entropy_jax.sharding import make_mesh, replicated, shard_batch
from entropy_jax.train.objective import make_loss
from entropy_jax.train.optim import make_optimizer, make_schedule
from entropy_jax.train.step import init_state, make_flat_train_block, make_flat_train_step

SHAPES = {  # name: (layers, width, heads, seq_len, batch, vocab)
    "reference": (4, 256, 4, 256, 16, 512),
    "gpt2-small": (12, 768, 12, 1024, 16, 50304),  # GPT-2 124M with nanoGPT's padded vocabulary
    "tiny": (2, 32, 4, 64, 32, 1024),  # the demo config
    "small": (4, 128, 4, 256, 32, 1024),
}
# Configured like nanoGPT (bias=False): tied embeddings, no projection biases, exact GELU.
PEER_LIKE = dict(tie_embeddings=True, attention_bias=False, mlp_bias=False, activation="gelu_exact")
MODEL_KWARGS = {"reference": PEER_LIKE, "gpt2-small": PEER_LIKE, "tiny": {}, "small": {}}
# Dense datasheet peaks in TFLOP/s per device: (bfloat16, float32 matmuls as TF32 / the MXU default).
PEAK_TFLOPS = {"H200": (989.0, 494.7), "H100": (989.0, 494.7), "A100": (312.0, 156.0),
               "L4": (121.0, 60.0), "TPU v5 lite": (197.0, 197.0), "TPU v4": (275.0, 275.0)}
TRAIN = dict(lr=1e-3, warmup_steps=10, end_lr=1e-4, steps=1000, weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0)


def matmul_tflops(mesh, n: int = 2048, reps: int = 10) -> float:
    """Measured float32 matmul throughput over the mesh (the CPU baseline for MFU)."""
    a = jax.device_put(jnp.ones((mesh.devices.size * n, n), jnp.float32), jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec("data")))
    f = jax.jit(lambda x: x @ x[:n].T)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(reps):
        out = f(a)
    out.block_until_ready()
    return 2 * a.shape[0] * n * n * reps / (time.perf_counter() - t0) / 1e12


def matmul_params(mcfg: ModelConfig) -> int:
    """Parameters that take part in matmuls: all but the position table and an untied input embedding."""
    layer = 4 * mcfg.d_model ** 2 + 2 * mcfg.d_model * mcfg.ff_width
    return mcfg.num_layers * layer + mcfg.vocab_size * mcfg.d_model


def model_flops_per_token(mcfg: ModelConfig) -> float:
    return 6 * matmul_params(mcfg) + 12 * mcfg.num_layers * mcfg.max_len * mcfg.d_model


class JaxStep:
    """The jitted train step on fixed random batches, on the state's leaves as the training loop
    runs it (``make_flat_train_step``; with ``steps_per_call`` > 1 ``make_flat_train_block``, a
    ``lax.scan`` over that many batches per call): ``time_steps(n)`` -> seconds per step."""

    def __init__(self, mcfg: ModelConfig, batch: int, loss_chunk: int, steps_per_call: int = 1):
        self.mesh = make_mesh()
        tx = make_optimizer(TRAIN)
        graphdef, params, model_state = init_model(mcfg, seed=0)
        self.n_params = sum(x.size for x in jax.tree.leaves(params))
        state = jax.device_put(init_state(params, model_state, tx, seed=0), replicated(self.mesh))
        self.state, treedef = jax.tree.flatten(state)
        loss = make_loss({"name": "next_token", **({"chunk": loss_chunk} if loss_chunk else {})})
        self.steps_per_call = k = steps_per_call
        make = make_flat_train_step if k == 1 else make_flat_train_block
        self.step = make(graphdef, tx, make_schedule(TRAIN), loss, treedef)
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, mcfg.vocab_size, (4, k, batch, mcfg.max_len + 1), dtype=np.int32)
        if k == 1:
            self.batches = [shard_batch({"inputs": t[0, :, :-1], "targets": t[0, :, 1:]}, self.mesh) for t in tokens]
        else:  # a block of k batches on a leading step axis, the batch axis sharded
            self.batches = [shard_batch({"inputs": t[..., :-1], "targets": t[..., 1:]}, self.mesh, axis=1)
                            for t in tokens]

    def time_steps(self, steps: int, warmup: int = 2) -> float:
        """Seconds per optimiser step over ``steps`` steps (rounded up to whole calls)."""
        calls = -(-steps // self.steps_per_call)
        for i in range(warmup):
            self.state, _ = self.step(self.state, self.batches[i % 4])
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for i in range(calls):
            self.state, m = self.step(self.state, self.batches[i % 4])  # no host sync inside the loop
        jax.block_until_ready(m)
        return (time.perf_counter() - t0) / (calls * self.steps_per_call)

    def trace(self, directory: str, steps: int = 3) -> None:
        """A jax.profiler trace (TensorBoard / Perfetto) of ``steps`` steps."""
        with jax.profiler.trace(directory):
            self.time_steps(steps, warmup=0)


def step_gemms(mcfg: ModelConfig, batch: int) -> list[tuple[tuple[int, ...], tuple[int, ...], str, int]]:
    """The train step's matrix products as ``(a shape, b shape, einsum, count per step)``: forward,
    input gradient and weight gradient of every projection and of the unembedding, and the two
    attention products (three times each: forward and two backward) in the model's query blocks."""
    n, d, f, v, layers = batch * mcfg.max_len, mcfg.d_model, mcfg.ff_width, mcfg.vocab_size, mcfg.num_layers
    bh, k, t = batch * mcfg.num_heads, mcfg.d_head, mcfg.max_len
    gemms = []
    for i, o, count in [(d, d, 4 * layers), (d, f, layers), (f, d, layers), (d, v, 1)]:
        gemms += [((n, i), (i, o), "nk,km->nm", count), ((n, o), (i, o), "nm,km->nk", count),
                  ((n, i), (n, o), "nk,nm->km", count)]
    block = default_query_block(t)
    for start in range(0, t, block):  # a query block against the keys up to its last position
        q, s = min(block, t - start), min(start + block, t)
        gemms += [((bh, q, k), (bh, s, k), "bqk,bsk->bqs", 3 * layers),
                  ((bh, q, s), (bh, s, k), "bqs,bsk->bqk", 3 * layers)]
    return gemms


class GemmFloor:
    """The step's matrix products (:func:`step_gemms`), each jitted and timed alone; ``time_steps(n)``
    -> their summed seconds (what the step would take on this XLA build were all else free)."""

    def __init__(self, mcfg: ModelConfig, batch: int):
        rng = np.random.default_rng(0)
        self.calls = []
        for a, b, eq, count in step_gemms(mcfg, batch):
            fn = jax.jit(functools.partial(jnp.einsum, eq))
            args = [jnp.asarray(rng.standard_normal(s, dtype=np.float32), mcfg.dtype) for s in (a, b)]
            fn(*args).block_until_ready()
            self.calls.append((fn, args, count))

    def time_steps(self, steps: int) -> float:
        total = 0.0
        for fn, args, count in self.calls:
            t0 = time.perf_counter()
            for _ in range(steps):
                out = fn(*args)
            out.block_until_ready()
            total += count * (time.perf_counter() - t0) / steps
        return total


def load_peer():
    """benchmarks/nanogpt_peer.py (needs PyTorch)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import nanogpt_peer

    return nanogpt_peer


def want_peer(flag: str, shape: str) -> bool:
    if flag in ("true", "false"):
        return flag == "true"
    if shape != "reference" or jax.default_backend() != "cpu":
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        print("(no PyTorch: the nanoGPT peer row is left out; pip install torch to add it)", file=sys.stderr)
        return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="reference", choices=sorted(SHAPES), help="named model/batch shape")
    p.add_argument("--steps", type=int, default=10, help="timed steps per repeat (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the table gives their median and spread")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32 | bfloat16)")
    p.add_argument("--loss_chunk", type=int, default=0, help="train.loss.chunk: positions unembedded at a time")
    p.add_argument("--peer", default="auto", choices=("auto", "true", "false"),
                   help="time nanoGPT (PyTorch) in the same run; auto: on the reference shape on CPU")
    p.add_argument("--gemm_floor", action="store_true",
                   help="add a row for the step's matrix products alone, each timed by itself in XLA")
    p.add_argument("--steps_per_call", type=int, default=1,
                   help="optimiser steps per jitted call (train.steps_per_call: a lax.scan over a block of batches)")
    p.add_argument("--profile_dir", default="", help="also write a jax.profiler trace of 3 steps here")
    args = p.parse_args()
    layers, width, heads, seq, batch, vocab = SHAPES[args.shape]
    n_dev = jax.device_count()
    batch = max(batch, n_dev) // n_dev * n_dev
    mcfg = ModelConfig(vocab_size=vocab, d_model=width, num_layers=layers, num_heads=heads, max_len=seq,
                       dtype=args.dtype, **MODEL_KWARGS[args.shape])
    ours = JaxStep(mcfg, batch, args.loss_chunk, args.steps_per_call)
    peer = None
    if want_peer(args.peer, args.shape):
        nanogpt = load_peer()
        peer = nanogpt.Peer(layers, width, heads, seq, batch, vocab)
    floor = GemmFloor(mcfg, batch) if args.gemm_floor else None
    times: dict[str, list[float]] = {"entropy_jax": [], "nanoGPT": [], "floor": []}
    for _ in range(args.repeats):  # interleaved, so all see the same machine load
        times["entropy_jax"].append(ours.time_steps(args.steps))
        if peer is not None:
            times["nanoGPT"].append(peer.time_steps(args.steps))
        if floor is not None:
            times["floor"].append(floor.time_steps(args.steps))
    assert ours.step._cache_size() == 1, "the train step recompiled"
    if args.profile_dir:
        ours.trace(args.profile_dir)
    print_table(args, mcfg, ours, peer, times, batch * seq)


def print_table(args, mcfg: ModelConfig, ours: JaxStep, peer, times: dict[str, list[float]], tokens: int) -> None:
    kind = jax.devices()[0].device_kind
    known = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    n_dev = ours.mesh.devices.size
    if known:
        peak, peak_name = known[args.dtype != "bfloat16"] * n_dev, f"datasheet {kind} {args.dtype}"
    else:
        peak, peak_name = matmul_tflops(ours.mesh), "measured f32 matmul"
    flops = model_flops_per_token(mcfg)
    base = statistics.median(times["nanoGPT"]) if times["nanoGPT"] else None
    shape = f"{args.shape} L{mcfg.num_layers} d{mcfg.d_model} h{mcfg.num_heads} T{mcfg.max_len} " \
            f"B{tokens // mcfg.max_len} V{mcfg.vocab_size} {args.dtype}"
    calls = f", {ours.steps_per_call} steps per call" if ours.steps_per_call > 1 else ""
    print(f"| train step | shape | devices | params | step ms | tokens/s | spread tokens/s | "
          f"model TFLOP/s | peak TFLOP/s ({peak_name}) | MFU | vs nanoGPT |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [(f"entropy_jax (JAX, jit{calls})", times["entropy_jax"], f"{n_dev}x {kind}", ours.n_params)]
    if times["floor"]:
        rows.append(("its GEMMs alone (XLA, each timed by itself, summed)", times["floor"], f"1x {kind}",
                     ours.n_params))
    if peer is not None:
        import torch

        rows.append((f"nanoGPT (PyTorch {torch.__version__.split('+')[0]} eager)", times["nanoGPT"],
                     f"cpu, {torch.get_num_threads()} threads", peer.n_params))
    for name, ts, devices, n_params in rows:
        dt = statistics.median(ts)
        achieved = tokens / dt * flops / 1e12
        ratio = f"{base / dt:.2f}x" if base else "-"
        print(f"| {name} | {shape} | {devices} | {n_params / 1e6:.2f}M | {dt * 1e3:.1f} | {tokens / dt:,.0f} | "
              f"{tokens / max(ts):,.0f}-{tokens / min(ts):,.0f} | {achieved:.3f} | {peak:.3f} | "
              f"{achieved / peak:.1%} | {ratio} |")


if __name__ == "__main__":
    main()
