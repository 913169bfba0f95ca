#!/usr/bin/env python3
"""PyTorch-eager twin of examples/train_tiny_gpt (benchmark only; never a build or test dependency).

Same architecture (pre-norm GPT, rotary positions in the rotate-half layout, tied embeddings, tanh-GELU
MLP, no biases, residual dropout 0.1), same data pipeline and hyperparameters (AdamW betas (0.9, 0.95), warmup + cosine,
clipping at 1.0), CPU with --threads threads. Prints time per training step and tokens/s next to the
losses, so the two programs' step times can be compared on one machine:

    OMP_NUM_THREADS=2 python3 bench/train_tiny_gpt_torch.py --steps 50
    OMP_NUM_THREADS=2 build/train_tiny_gpt --steps 50
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Rotary(nn.Module):
    def __init__(self, head_dim, max_pos, base=10000.0):
        super().__init__()
        half = head_dim // 2
        inv = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
        ang = torch.arange(max_pos, dtype=torch.float64)[:, None] * inv[None, :]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def forward(self, x):  # [B, H, L, E]
        L, half = x.shape[2], x.shape[3] // 2
        c, s = self.cos[:L], self.sin[:L]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)


class Attention(nn.Module):
    def __init__(self, d, h, ctx):
        super().__init__()
        self.h, self.e = h, d // h
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.rope = Rotary(self.e, ctx)

    def forward(self, x):
        B, L, D = x.shape
        q, k, v = (p(x).view(B, L, self.h, self.e).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.rope(q), self.rope(k)
        # Eager math attention (what flex_attention decomposes to in eager PyTorch on CPU; Debian's
        # torch 1.13 has no scaled_dot_product_attention).
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.e))
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        y = s.masked_fill(~causal, float("-inf")).softmax(-1) @ v
        return self.o_proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, d, h, ctx, dropout):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d, h, ctx)
        self.fc, self.proj = nn.Linear(d, 4 * d, bias=False), nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        x = x + self.drop(self.attn(self.norm1(x)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab, d, layers, h, ctx, dropout):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, h, ctx, dropout) for _ in range(layers))
        self.norm_f = nn.LayerNorm(d)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                resid = name.endswith("o_proj.weight") or name.endswith(".proj.weight")
                std = 0.02 / math.sqrt(2 * layers) if resid else 0.02
                nn.init.normal_(p, 0, std)

    def forward(self, idx):
        h = self.tok_emb(idx)
        for b in self.blocks:
            h = b(h)
        return F.linear(self.norm_f(h), self.tok_emb.weight)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="/usr/share/common-licenses/GPL-3")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1337)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    text = open(a.data, "rb").read()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n_train = len(ids) * 9 // 10
    counts = torch.bincount(ids).double()
    p = counts[counts > 0] / len(ids)
    unigram = float(-(p * p.log()).sum())
    model = GPT(len(chars), a.d_model, a.layers, a.heads, a.context, a.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    T = a.context

    def batch(lo, hi, g=None):
        s = torch.randint(lo, hi - T - 1, (a.batch,), generator=g)
        x = torch.stack([ids[i:i + T] for i in s.tolist()])
        y = torch.stack([ids[i + 1:i + T + 1] for i in s.tolist()])
        return x, y

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * prog))

    times, cpu = [], []
    for step in range(a.steps):
        x, y = batch(0, n_train)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if (step + 1) % 10 == 0 or step + 1 == a.steps:
            print(f"step {step + 1}/{a.steps} loss {loss.item():.4f} {1000 * times[-1]:.0f} ms/step", flush=True)
    model.eval()
    g = torch.Generator().manual_seed(a.seed + 2)
    with torch.no_grad():
        val = sum(F.cross_entropy(model(x).view(-1, len(chars)), y.view(-1)).item()
                  for x, y in (batch(n_train, len(ids), g) for _ in range(8))) / 8
    steady = sorted(times[min(5, len(times) - 1):])
    med = steady[len(steady) // 2]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: median {1000 * med:.1f} ms/step, "
          f"{a.batch * T / med:.0f} tokens/s, total {sum(times):.1f} s, {1000 * sum(cpu) / len(cpu):.1f} CPU-ms/step")
    print(f"unigram entropy {unigram:.4f} nats/char | held-out loss {val:.4f}")


if __name__ == "__main__":
    main()
