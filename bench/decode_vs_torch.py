#!/usr/bin/env python3
"""PyTorch on the decode step of bench/bench_decode_cuda.cpp, timed the same way.

One query token per sequence, bf16, GQA: q [B, Hq, 1, D], k / v [B, Hkv, S, D]. Rows: compiled
flex_attention (PyTorch's flex-decoding kernel; no block mask) and scaled_dot_product_attention with the
flash backend (enable_gqa). Each timing is the mean of --iters back-to-back calls between two CUDA events,
median of --reps, after warm-up; K/V bytes read per second at that time.

    python3 bench/decode_vs_torch.py [--shapes B,Hq,Hkv,S,D ...] [--reps 7] [--iters 20] [--csv FILE]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import flex_attention


def time_calls(fn, reps, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t = []
    for _ in range(reps):
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        t.append(a.elapsed_time(b) / iters)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["8,32,8,8192,128", "32,32,8,4096,128"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--csv")
    args = ap.parse_args()
    flex = torch.compile(flex_attention, dynamic=False)
    rows = ["shape,variant,ms,kv_tbps"]
    print(f"{'shape':22s} {'variant':18s} {'ms/call':>10s} {'KV TB/s':>10s}")
    for spec in args.shapes:
        B, Hq, Hkv, S, D = map(int, spec.split(","))
        torch.manual_seed(7)
        q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
        kv_bytes = 2 * B * Hkv * S * D * 2
        ref = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(Hq // Hkv, 1),
                                             v.float().repeat_interleave(Hq // Hkv, 1))

        def sdpa_flash():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        variants = [("torch-flex", lambda: flex(q, k, v, enable_gqa=True)), ("torch-sdpa-flash", sdpa_flash)]
        with torch.no_grad():
            for name, fn in variants:
                try:
                    err = (fn().float() - ref).abs().max().item()
                    assert err < 2e-2, f"{name} differs from the float32 math result by {err}"
                    ms = time_calls(fn, args.reps, args.iters)
                except Exception as e:  # report the row as failed, keep the others
                    print(f"{spec:22s} {name:18s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                bw = kv_bytes / (ms * 1e-3) / 1e12
                print(f"{spec:22s} {name:18s} {ms:10.4f} {bw:10.3f}", flush=True)
                rows.append(f'"{spec}",{name},{ms},{bw}')
    if args.csv:
        with open(args.csv, "w") as f:
            f.write("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
