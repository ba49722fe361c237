"""The peer of benchmarks/train_throughput.py: a nanoGPT-architecture train step in PyTorch (eager).

  python benchmarks/nanogpt_peer.py                 # the reference shape, alone (one-row table)

Architecture as in karpathy/nanoGPT's ``model.py`` with ``bias=False``, written here from its
description: learned token and position embeddings, pre-norm blocks of LayerNorm (weight only)
-> causal self-attention (one fused W_qkv, ``F.scaled_dot_product_attention(is_causal=True)``,
W_o) and LayerNorm -> MLP (4d, exact GELU), a final LayerNorm, and the unembedding tied to the
token embedding; no biases, no dropout. Initialisation N(0, 0.02), output projections
N(0, 0.02 / sqrt(2 L)). The step is nanoGPT's ``train.py``: cross-entropy, backward, global-norm
clipping at 1.0, AdamW (``fused=False``, betas 0.9/0.95, weight decay on matrices only),
zero_grad(set_to_none=True). PyTorch is a development tool here (never imported by the package).
"""

from __future__ import annotations

import argparse
import math
import os
import time

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - a development-only dependency
    raise SystemExit("benchmarks/nanogpt_peer.py needs PyTorch (CPU): pip install torch") from e


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_out = nn.Linear(4 * d, d, bias=False)

    def attention(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BxTxD.shape
        q, k, v = self.qkv(x_BxTxD).split(d, dim=2)
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in (q, k, v))
        y_BxHxTxK = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_out(y_BxHxTxK.transpose(1, 2).contiguous().view(b, t, d))

    def forward(self, x_BxTxD: torch.Tensor) -> torch.Tensor:
        x_BxTxD = x_BxTxD + self.attention(self.ln_1(x_BxTxD))
        return x_BxTxD + self.mlp_out(F.gelu(self.fc(self.ln_2(x_BxTxD))))


class NanoGPT(nn.Module):
    def __init__(self, layers: int, d: int, heads: int, max_len: int, vocab: int):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn_out.weight", "mlp_out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens_BxT: torch.Tensor, targets_BxT: torch.Tensor) -> torch.Tensor:
        t = tokens_BxT.shape[1]
        x = self.wte(tokens_BxT) + self.wpe(torch.arange(t, device=tokens_BxT.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets_BxT.reshape(-1))


def make_optimizer(model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.1) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=False)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    loss = model(inputs, targets)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


class Peer:
    """A built nanoGPT model, optimiser and fixed random batches: ``time_steps(n)`` -> seconds per step."""

    def __init__(self, layers: int, d: int, heads: int, seq: int, batch: int, vocab: int, seed: int = 0,
                 threads: int | None = None):
        torch.set_num_threads(threads or cores())
        torch.manual_seed(seed)
        self.model = NanoGPT(layers, d, heads, seq, vocab)
        self.opt = make_optimizer(self.model)
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (4, batch, seq + 1), generator=g)
        self.batches = [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]
        self.n_params = sum(p.numel() for p in self.model.parameters())

    def time_steps(self, steps: int, warmup: int = 2) -> float:
        for i in range(warmup):
            train_step(self.model, self.opt, *self.batches[i % 4])
        t0 = time.perf_counter()
        for i in range(steps):
            loss = train_step(self.model, self.opt, *self.batches[i % 4])
        loss.item()
        return (time.perf_counter() - t0) / steps


def cores() -> int:
    """CPU cores this process may use (the JAX CPU client uses them all)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    args = p.parse_args()
    shape = (4, 256, 4, 256, 16, 512)  # the reference shape of train_throughput.py
    peer = Peer(*shape)
    dt = peer.time_steps(args.steps)
    print("| peer | threads | params | step ms | tokens/s |")
    print("|---|---|---|---|---|")
    print(f"| nanoGPT (PyTorch {torch.__version__} eager) | {torch.get_num_threads()} | "
          f"{peer.n_params / 1e6:.2f}M | {dt * 1e3:.1f} | {shape[3] * shape[4] / dt:,.0f} |")


if __name__ == "__main__":
    main()
