#!/usr/bin/env python3
"""PyTorch twin of examples/train_tiny_gpt (benchmark only; never a build or test dependency).

Same architecture (pre-norm GPT, rotary positions in the rotate-half layout, tied embeddings, tanh-GELU
MLP, no biases, residual dropout 0.1), same data pipeline and hyperparameters (AdamW betas (0.9, 0.95), warmup + cosine,
clipping at 1.0). Prints the median time per training step, tokens/s and (on CUDA) peak GPU memory, so the two
programs' step times can be compared on one machine:

    OMP_NUM_THREADS=2 python3 bench/train_tiny_gpt_torch.py --steps 50
    OMP_NUM_THREADS=2 build/train_tiny_gpt --steps 50

On a GPU (--device cuda) the attention is --attention sdpa (F.scaled_dot_product_attention(is_causal=True),
what eager PyTorch users run), flex (flex_attention with a causal BlockMask; use it with --compile, as eager
flex_attention is unfused) or math (the explicit softmax, as on the CPU); --precision bf16 runs the step under
torch.autocast(bfloat16) with float32 weights, as train_tiny_gpt --precision bf16 does.
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


ATTENTION = "math"
BLOCK_MASK = None


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
        if ATTENTION == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.o_proj(y.transpose(1, 2).reshape(B, L, D))
        if ATTENTION == "flex":
            from torch.nn.attention.flex_attention import flex_attention
            y = flex_attention(q, k, v, block_mask=BLOCK_MASK)
            return self.o_proj(y.transpose(1, 2).reshape(B, L, D))
        # Eager math attention (what flex_attention decomposes to in eager PyTorch on CPU; Debian's
        # torch 1.13 has no scaled_dot_product_attention).
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.e))
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
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
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--attention", default="math", choices=["math", "sdpa", "flex"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--preset", default="tiny", choices=["tiny", "gpt2-small"])
    a = ap.parse_args()
    if a.preset == "gpt2-small":  # as train_tiny_gpt: explicit options win
        given = {arg.split("=")[0] for arg in __import__("sys").argv[1:]}
        for flag, field, value in (("--layers", "layers", 12), ("--d-model", "d_model", 768), ("--heads", "heads", 12),
                                   ("--context", "context", 1024), ("--lr", "lr", 6e-4), ("--min-lr", "min_lr", 6e-5)):
            if flag not in given:
                setattr(a, field, value)
    global ATTENTION, BLOCK_MASK
    ATTENTION = a.attention
    dev = torch.device(a.device)
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
    model = GPT(len(chars), a.d_model, a.layers, a.heads, a.context, a.dropout).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    T = a.context
    if a.attention == "flex":
        from torch.nn.attention.flex_attention import create_block_mask
        BLOCK_MASK = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, T, T, device=a.device)
    fwd = torch.compile(model) if a.compile else model
    amp = (lambda: torch.autocast(a.device, dtype=torch.bfloat16)) if a.precision == "bf16" else __import__("contextlib").nullcontext

    def batch(lo, hi, g=None):
        s = torch.randint(lo, hi - T - 1, (a.batch,), generator=g)
        x = torch.stack([ids[i:i + T] for i in s.tolist()])
        y = torch.stack([ids[i + 1:i + T + 1] for i in s.tolist()])
        return x.to(dev), y.to(dev)

    def lr_at(step):
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        prog = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * prog))

    times, cpu = [], []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        x, y = batch(0, n_train)
        with amp():
            loss = F.cross_entropy(fwd(x).view(-1, len(chars)).float(), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step)
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if (step + 1) % 10 == 0 or step + 1 == a.steps:
            print(f"step {step + 1}/{a.steps} loss {loss.item():.4f} {1000 * times[-1]:.0f} ms/step", flush=True)
    model.eval()
    g = torch.Generator().manual_seed(a.seed + 2)
    with torch.no_grad(), amp():
        val = sum(F.cross_entropy(fwd(x).view(-1, len(chars)).float(), y.view(-1)).item()
                  for x, y in (batch(n_train, len(ids), g) for _ in range(8))) / 8
    steady = sorted(times[min(5, len(times) - 1):])
    med = steady[len(steady) // 2]
    where = (f"{torch.cuda.get_device_name()}, peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
             if dev.type == "cuda" else f"{torch.get_num_threads()} threads")
    print(f"torch {torch.__version__} ({a.device}, {a.precision}, attention {a.attention}"
          f"{', compiled' if a.compile else ''}), {where}: median {1000 * med:.1f} ms/step, "
          f"{a.batch * T / med:.0f} tokens/s, total {sum(times):.1f} s, {1000 * sum(cpu) / len(cpu):.1f} CPU-ms/step")
    print(f"unigram entropy {unigram:.4f} nats/char | held-out loss {val:.4f}")


if __name__ == "__main__":
    main()
