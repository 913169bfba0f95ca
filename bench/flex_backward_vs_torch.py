# PyTorch's compiled flex_attention backward on the shapes of DISABLED_BenchBf16
# (tests/cuda/test_flex_backward_cuda.cpp): bf16 B=4 H=16 S=4096 D=128, no mask and causal (BlockMask
# 128), TFLOP/s as 2.5 x the forward's 4 B H S^2 D over the visited blocks. Median of do_bench.
import os
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from triton.testing import do_bench

B, H, D = 4, 16, 128
S = int(os.environ.get("FLEXGRAD_BENCH_S", "4096"))
flex = torch.compile(flex_attention, dynamic=False)
torch.manual_seed(0)
q, k, v, dout = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
for p in (q, k, v):
    p.requires_grad_(True)
cases = []
for name in ("nomask", "causal"):
    bm = None
    density = 1.0
    if name == "causal":
        bm = create_block_mask(lambda b, h, qi, kv: qi >= kv, None, None, S, S, device="cuda")
        density = 1 - bm.sparsity() / 100
    out = flex(q, k, v, block_mask=bm)
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # compiles the backward
    cases.append((name, density, out))
torch.cuda.synchronize()
# Optional go-file (argv[1]): compile while the other benchmark builds, time only once it is done.
if len(sys.argv) > 1:
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.5)
for name, density, out in cases:
    bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    ms = do_bench(bwd, warmup=100, rep=500, return_mode="median")
    flops = 2.5 * 4 * B * H * S * S * D * density
    print(f"torch    bwd bf16 B={B} H={H} S={S} D={D} {name:7s} density {density:.3f}: {ms:.3f} ms  {flops / ms / 1e9:.1f} TFLOP/s")
