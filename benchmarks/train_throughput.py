"""Train-step throughput (tokens/s) and model-FLOPs utilisation for a named shape.

  python benchmarks/train_throughput.py                      # the reference shape, all devices
  python benchmarks/train_throughput.py --shape=tiny --steps=50

Prints one table. MFU = model FLOPs/s / peak FLOPs/s, where model FLOPs per token are
6 N (parameter matmuls, forward + backward) + 12 L T d (attention scores and mixing) and the
peak is the device's datasheet figure when known, else the baseline measured in the same run:
a large float32 matmul on the same devices (so on CPU the ratio is "fraction of achievable
matmul throughput").
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from entropy_jax.models import ModelConfig, init_model
from entropy_jax.sharding import make_mesh, replicated, shard_batch
from entropy_jax.train.optim import make_optimizer, make_schedule
from entropy_jax.train.step import init_state, make_train_step

SHAPES = {  # name: (layers, width, heads, seq_len, batch, vocab)
    "reference": (4, 256, 4, 256, 16, 512),
    "tiny": (2, 32, 4, 64, 32, 1024),  # the demo config
    "small": (4, 128, 4, 256, 32, 1024),
}
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "TPU v5 lite": 197.0, "TPU v4": 275.0}
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


def model_flops_per_token(mcfg: ModelConfig, n_params: int) -> float:
    return 6 * n_params + 12 * mcfg.num_layers * mcfg.max_len * mcfg.d_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="reference", choices=sorted(SHAPES), help="named model/batch shape")
    p.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--dtype", default="float32", help="compute dtype (float32 | bfloat16)")
    args = p.parse_args()
    layers, width, heads, seq, batch, vocab = SHAPES[args.shape]
    mesh = make_mesh()
    batch = max(batch, mesh.devices.size) // mesh.devices.size * mesh.devices.size
    mcfg = ModelConfig(vocab_size=vocab, d_model=width, num_layers=layers, num_heads=heads, max_len=seq,
                       dtype=args.dtype)
    tx = make_optimizer(TRAIN)
    graphdef, params, model_state = init_model(mcfg, seed=0)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    state = jax.device_put(init_state(params, model_state, tx, seed=0), replicated(mesh))
    step = make_train_step(graphdef, tx, make_schedule(TRAIN))
    rng = np.random.default_rng(0)
    batches = [shard_batch({"inputs": t[:, :-1], "targets": t[:, 1:]}, mesh)
               for t in rng.integers(0, vocab, (4, batch, seq + 1), dtype=np.int32)]
    for i in range(3):
        state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = step(state, batches[i % 4])  # no host sync inside the loop
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / args.steps
    tokens_per_s = batch * seq / dt
    achieved = tokens_per_s * model_flops_per_token(mcfg, n_params) / 1e12
    kind = jax.devices()[0].device_kind
    known = next((v for k, v in PEAK_TFLOPS.items() if k in kind), None)
    peak, peak_name = ((known * mesh.devices.size, f"datasheet {kind}") if known else
                       (matmul_tflops(mesh), "measured f32 matmul"))
    print(f"| shape | devices | params | step ms | tokens/s | model TFLOP/s | peak TFLOP/s ({peak_name}) | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {args.shape} L{layers} d{width} h{heads} T{seq} B{batch} V{vocab} {args.dtype} | "
          f"{mesh.devices.size}x {kind} | {n_params / 1e6:.2f}M | {dt * 1e3:.1f} | {tokens_per_s:,.0f} | "
          f"{achieved:.3f} | {peak:.3f} | {achieved / peak:.1%} |")
    assert step._cache_size() == 1, "the train step recompiled"


if __name__ == "__main__":
    main()
