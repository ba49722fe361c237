"""The train-throughput benchmark: its GEMM list is the step's whole matmul work, and it runs."""

import math
import os
import subprocess
import sys

import pytest
from conftest import REPO, load_module

from entropy_jax.models import ModelConfig


@pytest.mark.parametrize("shape, causal_fraction", [("reference", 0.625), ("tiny", 1.0)])
def test_step_gemms_are_the_models_matmul_flops(shape, causal_fraction):
    """Sum of 2 m n k over the listed products == 6 N per token (N: matmul parameters) + the attention's
    12 L T d per token, times the fraction of the T x T square the query blocks compute (block i of
    4 covers i quarters: (1 + 2 + 3 + 4) / 16 at T = 256; one full call at T = 64)."""
    bench = load_module("benchmarks/train_throughput.py")
    layers, width, heads, seq, batch, vocab = bench.SHAPES[shape]
    mcfg = ModelConfig(vocab_size=vocab, d_model=width, num_layers=layers, num_heads=heads, max_len=seq)
    flops = 0
    for a, b, eq, count in bench.step_gemms(mcfg, batch):
        dims = {}
        for letters, sizes in zip(eq.split("->")[0].split(","), (a, b), strict=True):
            for letter, size in zip(letters, sizes, strict=True):
                assert dims.setdefault(letter, size) == size, (eq, a, b)  # operands agree on shared dims
        flops += 2 * count * math.prod(dims.values())
    tokens = batch * seq
    want = tokens * (6 * bench.matmul_params(mcfg) + 12 * layers * seq * width * causal_fraction)
    assert flops == want


def test_benchmark_prints_its_rows_and_writes_a_trace(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--shape=tiny", "--peer=false",
                          "--steps=1", "--repeats=1", "--steps_per_call=2", "--gemm_floor",
                          f"--profile_dir={tmp_path}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 steps per call" in out.stdout
    rows = [line for line in out.stdout.splitlines() if line.startswith("| entropy_jax") or
            line.startswith("| its GEMMs alone")]
    assert len(rows) == 2, out.stdout
    for row in rows:
        tokens_per_s = float(row.split("|")[6].replace(",", ""))
        assert tokens_per_s > 0
    assert any(p.is_file() for p in tmp_path.rglob("*")), "no profiler trace written"
