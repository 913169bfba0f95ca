#!/usr/bin/env python3
"""PyTorch's compiled flex_attention on the cases of bench/bench_flex_cuda.cpp, timed the same way.

Same shapes, masks (create_block_mask on the GPU, BLOCK_SIZE 128, B = H = None), score mods and document
lengths (the same 64-bit LCG) as the C++ benchmark; each call between two CUDA events after warm-up, gradients
set to None (untimed) before each backward, median of --reps. TFLOP/s on visited blocks as attention-gym:
fwd = 4 * B * H * D * S * S * density, bwd = 2.5 * fwd, density = 1 - sparsity / 100. On the cases without a
score_mod whose mask SDPA has (no mask, causal), also scaled_dot_product_attention on cuDNN
(SDPBackend.CUDNN_ATTENTION, is_causal), counted with the same FLOPs (so its column is a time ratio too).

    python3 bench/flex_vs_torch.py [--case NAME ...] [--reps N] [--csv FILE]
"""
import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

CASES = [  # name, dtype, B, H, S, D, mask, score: as all_cases() in bench_flex_cuda.cpp
    ("nomask", torch.bfloat16, 4, 16, 4096, 128, "none", "none"),
    ("causal", torch.bfloat16, 4, 16, 4096, 128, "causal", "none"),
    ("document", torch.bfloat16, 4, 16, 4096, 128, "document", "none"),
    ("sliding1024", torch.bfloat16, 4, 16, 4096, 128, "sliding1024", "none"),
    ("alibi_causal", torch.bfloat16, 4, 16, 4096, 128, "causal", "alibi"),
    ("softcap_causal", torch.bfloat16, 4, 16, 4096, 128, "causal", "softcap"),
    ("causal_d64_b8", torch.bfloat16, 8, 16, 4096, 64, "causal", "none"),
    ("causal_s16k_b1", torch.bfloat16, 1, 16, 16384, 128, "causal", "none"),
    ("fp32_causal", torch.float32, 8, 8, 1024, 64, "causal", "none"),
]
DTYPE_NAME = {torch.bfloat16: "bfloat16", torch.float32: "float32"}


def doc_ids(S, seed=2024):
    """Document ids of random lengths in [64, 320): the integers of doc_ids() in bench_flex_cuda.cpp."""
    x, ids, d = seed, [], 0
    while len(ids) < S:
        x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
        n = 64 + (x >> 33) % 256
        ids += [d] * min(n, S - len(ids))
        d += 1
    return ids


def make_mask(mask, S):
    if mask == "none":
        return None
    if mask == "causal":
        fn = lambda b, h, q, kv: q >= kv
    elif mask == "sliding1024":
        fn = lambda b, h, q, kv: (q >= kv) & (q - kv <= 1024)
    elif mask == "document":
        doc = torch.tensor(doc_ids(S), dtype=torch.int64, device="cuda")
        fn = lambda b, h, q, kv: doc[q] == doc[kv]
    else:
        raise ValueError(f"unknown mask {mask}")
    return create_block_mask(fn, B=None, H=None, Q_LEN=S, KV_LEN=S, device="cuda", BLOCK_SIZE=128)


def make_score(score, H):
    if score == "alibi":
        return lambda s, b, h, q, kv: s + (kv - q) * torch.exp2(-((h + 1) * 8.0 / H))
    if score == "softcap":
        return lambda s, b, h, q, kv: 20.0 * torch.tanh(s / 20.0)
    return None


def time_ms(fn, before, warmup, reps):
    times = []
    for i in range(warmup + reps):
        before()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        if i >= warmup:
            times.append(a.elapsed_time(b))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", action="append", default=[], help="run only these cases")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--csv", help="also write the rows as CSV to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("flex_vs_torch.py: no CUDA device", file=sys.stderr)
        return 2
    # One compiled graph per case (nine mods and shapes): lift the recompile limit so that no case falls back
    # to eager, and keep shapes static as attention-gym does.
    for attr in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, attr):
            setattr(torch._dynamo.config, attr, 64)
    compiled = torch.compile(flex_attention, dynamic=False)
    out_csv = open(args.csv, "w") if args.csv else None
    if out_csv:
        out_csv.write("case,dtype,B,H,S,D,density,fwd_ms,bwd_ms,fwd_tflops,bwd_tflops,cudnn_fwd_tflops,cudnn_bwd_tflops\n")
    print(f"PyTorch {torch.__version__} torch.compile(flex_attention) on {torch.cuda.get_device_name()}; "
          f"median of {args.reps} after {args.warmup} warm-up calls; TFLOP/s on visited blocks")
    print(f"{'case':<16} {'dtype':<9} {'B':>3} {'H':>3} {'S':>6} {'D':>4} {'density':>8} {'fwd ms':>9} {'fwd TF/s':>9} "
          f"{'bwd ms':>9} {'bwd TF/s':>9} {'cuDNN fwd':>9} {'cuDNN bwd':>9}", flush=True)
    failed = 0
    for name, dtype, B, H, S, D, mask, score in CASES:
        if args.case and name not in args.case:
            continue
        try:
            row = run_case(compiled, args, name, dtype, B, H, S, D, mask, score)
        except Exception as e:  # one case that cannot run does not hide the others
            print(f"{name:<16} FAILED: {type(e).__name__}: {e}", flush=True)
            failed += 1
            continue
        if out_csv:
            out_csv.write(row)
            out_csv.flush()
        torch.cuda.empty_cache()
    return 1 if failed else 0


def run_case(compiled, args, name, dtype, B, H, S, D, mask, score):
    """Times one case; returns its CSV row."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    dout = torch.randn(B, H, S, D, device="cuda", dtype=dtype)
    bm = make_mask(mask, S)
    density = 1.0 if bm is None else (100.0 - bm.sparsity()) / 100.0
    sm = make_score(score, H)
    fwd_flops = 4.0 * B * H * D * S * S * density
    bwd_flops = 2.5 * fwd_flops

    def fwd():
        with torch.no_grad():
            compiled(q, k, v, score_mod=sm, block_mask=bm)

    fwd_ms = time_ms(fwd, lambda: None, args.warmup, args.reps)
    out = compiled(q, k, v, score_mod=sm, block_mask=bm)

    def reset():
        q.grad = k.grad = v.grad = None

    bwd_ms = time_ms(lambda: out.backward(dout, retain_graph=True), reset, args.warmup, args.reps)
    ftf, btf = fwd_flops / fwd_ms / 1e9, bwd_flops / bwd_ms / 1e9
    cf = cb = ""
    if score == "none" and mask in ("none", "causal") and dtype != torch.float32:
        try:  # cuDNN's fused SDPA on the same inputs
            causal = mask == "causal"
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                def cfwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                cf_ms = time_ms(cfwd, lambda: None, args.warmup, args.reps)
                cout = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                cb_ms = time_ms(lambda: cout.backward(dout, retain_graph=True), reset, args.warmup, args.reps)
            cf, cb = f"{fwd_flops / cf_ms / 1e9:.3f}", f"{bwd_flops / cb_ms / 1e9:.3f}"
        except Exception as e:  # a PyTorch or GPU without cuDNN attention: the flex columns still count
            print(f"{name}: cuDNN SDPA did not run: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
    print(f"{name:<16} {DTYPE_NAME[dtype]:<9} {B:>3} {H:>3} {S:>6} {D:>4} {density * 100:>7.1f}% {fwd_ms:>9.3f} "
          f"{ftf:>9.1f} {bwd_ms:>9.3f} {btf:>9.1f} {cf[:-2] or '-':>9} {cb[:-2] or '-':>9}", flush=True)
    return (f"{name},{DTYPE_NAME[dtype]},{B},{H},{S},{D},{density:.6f},{fwd_ms:.6f},{bwd_ms:.6f},"
            f"{ftf:.3f},{btf:.3f},{cf},{cb}\n")


if __name__ == "__main__":
    sys.exit(main())
