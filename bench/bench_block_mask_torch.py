"""PyTorch's create_block_mask on CUDA, timed as bench/bench_block_mask.cpp times ours: the median over
repeated calls after warm-up of the wall time of one call through to a synchronised device, and the
device time of one call from CUDA events. Same shapes and masks (causal, and a causal document mask over
documents of lengths 512, 256, 1024, 128, 640, 384, 896, 256)."""
import statistics
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

S = 4096
dev = "cuda"


def causal(b, h, q, kv):
    return q >= kv


lengths = [512, 256, 1024, 128, 640, 384, 896, 256]
doc = torch.cat([torch.full((n,), i, dtype=torch.int64) for i, n in enumerate(lengths)]).to(dev)


def document(b, h, q, kv):
    return (doc[q] == doc[kv]) & (q >= kv)


def time_call(f, warmup=20, iters=200):
    t0 = time.perf_counter()
    f()
    torch.cuda.synchronize()
    cold = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    wall, devt = [], []
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        w0 = time.perf_counter()
        a.record()
        f()
        b.record()
        b.synchronize()
        devt.append(a.elapsed_time(b))
        wall.append((time.perf_counter() - w0) * 1e3)
    return cold, statistics.median(wall), statistics.median(devt)


print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}: create_block_mask S={S} BLOCK_SIZE=128 "
      "(ms; median of 200 after 20 warm-up)")
print(f"{'case':<34} {'cold':>10} {'wall':>10} {'dev':>10} {'sparsity':>9}")
rows = [("causal B=None H=None", causal, None, None, False), ("causal B=4 H=16", causal, 4, 16, False),
        ("document B=None H=None", document, None, None, False), ("document B=4 H=16", document, 4, 16, False),
        # _compile=True traces the mask creation with torch.compile (seconds per new case): one row only.
        ("causal B=None H=None _compile=True", causal, None, None, True)]
for label, mm, B, H, compiled in rows:
    try:
        f = lambda: create_block_mask(mm, B, H, S, S, device=dev, _compile=compiled)
        cold, wall, devt = time_call(f)
        print(f"{label:<34} {cold:10.3f} {wall:10.3f} {devt:10.3f} {f().sparsity():8.2f}%")
    except Exception as e:  # report, keep measuring the other rows
        print(f"{label:<34} FAILED {type(e).__name__}: {str(e)[:200]}")
