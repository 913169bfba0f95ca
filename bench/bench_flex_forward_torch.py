"""PyTorch's compiled flex_attention forward on the shapes of bench_flex_forward_cuda (same TFLOP/s formula:
4*B*H*S*S*D*density, density 0.5 for causal). CUDA events after warm-up, median of runs."""
import os
import sys
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

CASES = [
    ("bf16_nomask", torch.bfloat16, 4, 16, 4096, 128, False),
    ("bf16_causal", torch.bfloat16, 4, 16, 4096, 128, True),
    ("f32_causal", torch.float32, 8, 8, 1024, 64, True),
]


def causal(b, h, q, kv):
    return q >= kv


def main(iters=30, go_file=None):
    flex = torch.compile(flex_attention, dynamic=False)
    prepared = []
    for name, dt, B, H, S, D, is_causal in CASES:  # compile everything first (CPU-bound)
        q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=dt) for _ in range(3))
        bm = create_block_mask(causal, None, None, S, S, device="cuda") if is_causal else None
        with torch.no_grad():
            for _ in range(3):
                flex(q, k, v, block_mask=bm)
        torch.cuda.synchronize()
        prepared.append((name, dt, B, H, S, D, is_causal, q, k, v, bm))
    print("torch: compiled", flush=True)
    while go_file and not os.path.exists(go_file):  # time only once the GPU is ours alone
        time.sleep(0.2)
    for name, dt, B, H, S, D, is_causal, q, k, v, bm in prepared:
        with torch.no_grad():
            flex(q, k, v, block_mask=bm)
            torch.cuda.synchronize()
            ms = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                flex(q, k, v, block_mask=bm)
                b.record()
                b.synchronize()
                ms.append(a.elapsed_time(b))
        ms.sort()
        med = ms[len(ms) // 2]
        flops = 4.0 * B * H * S * S * D * (0.5 if is_causal else 1.0)
        print(f"torch {name:<18} {str(dt):<15} median {med:.3f} ms  {flops / med * 1e-9:.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main(go_file=sys.argv[1] if len(sys.argv) > 1 else None)
