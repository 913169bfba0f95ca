#!/usr/bin/env python3
"""Our CPU flex_attention (bench_flex_cpu) against PyTorch on the CPU, same shapes and thread counts, one table.

    python3 bench/flex_cpu_vs_torch.py BUILD_DIR [--threads 2 16] [--reps 5] [--dtype f32|bf16] [-B 1 -H 8 -L 2048 -E 64]

For each thread count: ours (BUILD_DIR/bench_flex_cpu --csv --threads N: no mask, causal, sliding window 256,
16 equal documents), then PyTorch, one fresh process per mask with torch.set_num_threads(N) (inductor bakes the
thread count into the code it compiles; dynamo's recompile limit is per function, shared by every torch.compile of
flex_attention in a process, so masks sharing a process ran eagerly once it was reached):
torch.compile(flex_attention, fullgraph=True) forward on the same four masks
(create_block_mask on the CPU, BLOCK_SIZE 128) and its backward where PyTorch has one on the CPU, and
scaled_dot_product_attention forward and forward+backward on no mask and causal (is_causal=True). Inputs
from randn in --dtype (float32 by default; bf16 runs our bf16 products where the CPU has AVX-512 BF16). Each time is the fastest of --reps calls after two warm-up calls, as bench_flex_cpu.
GFLOP/s count the blocks our BlockMask visits (fwd 4 B H L^2 E density, fwd+bwd 3.5x that) for every column,
so a ratio is a ratio of times. PyTorch runs under --python (default /opt/torch/.venv/bin/python when present,
else this interpreter); without PyTorch the table holds ours alone. Inductor compiles single-threaded and
without its FX graph cache unless the environment says otherwise (each compile takes about a minute; see run_torch).
"""
import argparse
import csv
import io
import json
import os
import subprocess
import sys

MASKS = [("none", "no mask"), ("causal", "causal"), ("sliding", "sliding 256"), ("document", "document")]


def torch_worker(args):
    """Runs in the PyTorch process: prints one JSON object {mask: {column: ms}}."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.worker_threads)
    B, H, L, E = args.B, args.H, args.L, args.E
    torch.manual_seed(0)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    q, k, v = (torch.randn(B, H, L, E).to(dt).requires_grad_() for _ in range(3))

    def best_ms(fn, before=lambda: None):
        t = []
        for i in range(2 + args.reps):
            before()
            t0 = time.perf_counter()
            fn()
            if i >= 2:
                t.append((time.perf_counter() - t0) * 1e3)
        return min(t)

    def reset():
        q.grad = k.grad = v.grad = None

    res = {"torch": torch.__version__, "rows": {}}
    try:
        if args.no_flex:
            raise RuntimeError("not asked for at this thread count (--torch-flex-threads)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # fullgraph: a graph break raises instead of running parts eagerly. The worker runs one mask (a fresh
        # process each), so dynamo's per-function recompile limit is never reached (it was in one shared process:
        # the block-mask rows then ran eagerly, ~10x slow).
        compiled = lambda: torch.compile(flex_attention, dynamic=False, fullgraph=True)
    except Exception as e:  # a PyTorch without FlexAttention: SDPA only
        compiled, res["flex_error"] = None, f"{type(e).__name__}: {e}"
    doc = torch.arange(L) // max(1, L // 16)
    mods = {
        "none": None,
        "causal": lambda b, h, qi, kv: qi >= kv,
        "sliding": lambda b, h, qi, kv: (qi >= kv) & (qi - kv <= 256),
        "document": lambda b, h, qi, kv: doc[qi] == doc[kv],
    }
    for key, _ in MASKS:
        if args.masks and key not in args.masks:
            continue
        row = {}
        if compiled is not None:
            try:
                bm = None if mods[key] is None else create_block_mask(mods[key], None, None, L, L, device="cpu",
                                                                      BLOCK_SIZE=128)
                row["flex_density"] = 1.0 if bm is None else (100.0 - bm.sparsity()) / 100.0

                # PyTorch 2.11's CPU flex_attention refuses inputs that require grad (it has no CPU backward):
                # the forward gets fresh copies that do not, in a plain inference call (with a no_grad block and
                # detached views its block-mask rows ran ~10x slower than a direct probe of the same call).
                qd, kd, vd = (x.detach().clone() for x in (q, k, v))
                fn = compiled()
                calls = []

                def fwd():
                    t0 = time.perf_counter()
                    fn(qd, kd, vd, block_mask=bm)
                    calls.append((time.perf_counter() - t0) * 1e3)

                row["flex_fwd"] = best_ms(fwd)
                print(f"  torch flex {key}: every call (ms, the first compiles): " +
                      " ".join(f"{c:.1f}" for c in calls), file=sys.stderr, flush=True)
                try:  # a separate compiled function: a refused attempt must not touch the forward's
                    fb = compiled()
                    row["flex_fb"] = best_ms(lambda: fb(q, k, v, block_mask=bm).sum().backward(), reset)
                except Exception as e:  # PyTorch 2.11: no CPU backward for flex_attention
                    row["flex_fb_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            except Exception as e:
                row["flex_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        if key in ("none", "causal"):
            causal = key == "causal"

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            row["sdpa_fwd"] = best_ms(sdpa_fwd)
            row["sdpa_fb"] = best_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal).sum().backward(),
                                     reset)
        res["rows"][key] = row
        print(f"  torch {args.worker_threads} threads, {key}: {row}", file=sys.stderr, flush=True)
    print(json.dumps(res))


def run_ours(args, threads):
    exe = os.path.join(args.build_dir, "bench_flex_cpu")
    if not os.access(exe, os.X_OK):
        sys.exit(f"flex_cpu_vs_torch.py: no {exe} (build the bench_flex_cpu target first)")
    cmd = [exe, "--csv", "--no-reference", "--threads", str(threads), "--reps", str(args.reps), "--dtype", args.dtype,
           "-B", str(args.B),
           "-H", str(args.H), "-L", str(args.L), "-E", str(args.E)]
    if args.masks:
        cmd += ["--masks", *args.masks]
    print("== ours: " + " ".join(cmd), file=sys.stderr, flush=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return {r["mask"]: r for r in csv.DictReader(io.StringIO(out))}


def run_torch(args, threads):
    """One PyTorch process per mask (see the module comment); its stderr streams through as it runs."""
    python = args.python or ("/opt/torch/.venv/bin/python" if os.access("/opt/torch/.venv/bin/python", os.X_OK)
                             else sys.executable)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    # Inductor compiles in one thread, without its FX graph cache (a caller's own settings win): with its
    # default parallel compile workers, the 16-thread processes on the device host died or aborted in glibc's
    # heap checks (session 8: "malloc(): smallbin double linked list corrupted"); with these two they ran
    # (session 10). PyTorch's maintainers isolate such compiled-CPU crashes with the same two settings.
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    env.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
    merged, failures = None, []
    for key, _ in MASKS:
        if args.masks and key not in args.masks:
            continue
        if args.torch_flex_threads is not None and threads not in args.torch_flex_threads:
            if key not in ("none", "causal"):
                continue
            cmd_extra = ["--no-flex"]
        else:
            cmd_extra = []
        cmd = [python, os.path.abspath(__file__), "--torch-worker", str(threads), *cmd_extra, "--reps", str(args.reps), "--dtype",
               args.dtype, "-B", str(args.B), "-H", str(args.H), "-L", str(args.L), "-E", str(args.E), "--masks", key]
        print(f"== PyTorch ({python}), {threads} threads, {key}", file=sys.stderr, flush=True)
        p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)
        if p.returncode != 0 or not p.stdout.strip():
            failures.append(f"{key}: exit {p.returncode}")
            continue
        res = json.loads(p.stdout.strip().splitlines()[-1])
        if merged is None:
            merged = res
        else:
            merged["rows"].update(res["rows"])
    if merged is None:
        return None, "PyTorch did not run (" + "; ".join(failures) + ")"
    note = f"PyTorch {merged['torch']}" + (f"; its flex_attention did not run: {merged['flex_error']}" if "flex_error" in merged else "")
    if failures:
        note += "; PyTorch failed on " + ", ".join(failures)
    return merged, note


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build_dir", nargs="?", help="the build directory holding bench_flex_cpu")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--masks", nargs="+", choices=[m for m, _ in MASKS], help="run only these masks")
    ap.add_argument("--python", help="the interpreter with PyTorch")
    ap.add_argument("--torch-flex-threads", type=int, nargs="+",
                    help="run PyTorch's compiled flex_attention only at these thread counts (SDPA at every one); "
                         "its CPU compile takes 30-80 s per mask")
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("-B", type=int, default=1)
    ap.add_argument("-H", type=int, default=8)
    ap.add_argument("-L", type=int, default=2048)
    ap.add_argument("-E", type=int, default=64)
    ap.add_argument("--torch-worker", dest="worker_threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--no-flex", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker_threads:
        return torch_worker(args)
    if not args.build_dir:
        ap.error("BUILD_DIR is required")
    base = 4.0 * args.B * args.H * args.L * args.L * args.E
    hdr = "{:<12} {:>8} {:>9} {:>10} {:>6} {:>9} {:>6} {:>9} {:>10} {:>6} {:>9} {:>6}"
    for n in args.threads:  # each table printed as soon as its thread count is done
        ours = run_ours(args, n)
        tr, note = run_torch(args, n)
        print(f"\n{args.dtype} B={args.B} H={args.H} L={args.L} E={args.E}, {n} threads, GFLOP/s on our visited blocks; "
              f"ratio = ours / theirs (time ratio); {note}")
        print(hdr.format("mask", "density", "ours fwd", "flex fwd", "ratio", "SDPA fwd", "ratio", "ours f+b",
                         "flex f+b", "ratio", "SDPA f+b", "ratio"))
        for key, name in MASKS:
            o = ours.get(key)
            if o is None:
                continue
            dens = float(o["density"])
            fwd_f, fb_f = base * dens, 3.5 * base * dens
            t = (tr or {}).get("rows", {}).get(key, {})
            if "flex_density" in t and abs(t["flex_density"] - dens) > 1e-6:
                name += " !"  # PyTorch's BlockMask visits other blocks: not comparable
            ours_fwd, ours_fb = fwd_f / float(o["fwd_ms"]) / 1e6, fb_f / float(o["fb_ms"]) / 1e6

            def col(k, flops, mine):
                if k not in t:
                    return ["-", "-"]
                g = flops / t[k] / 1e6
                return [f"{g:.1f}", f"{mine / g:.2f}"]

            cells = [f"{ours_fwd:.1f}", *col("flex_fwd", fwd_f, ours_fwd), *col("sdpa_fwd", fwd_f, ours_fwd),
                     f"{ours_fb:.1f}", *col("flex_fb", fb_f, ours_fb), *col("sdpa_fb", fb_f, ours_fb)]
            print(hdr.format(name, f"{dens * 100:.1f}%", *cells))
            if "flex_fb_error" in t:
                print(f"  (PyTorch flex backward on the CPU: {t['flex_fb_error']})")
            if "flex_error" in t:
                print(f"  (PyTorch flex: {t['flex_error']})")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
