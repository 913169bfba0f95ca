#!/usr/bin/env bash
# Ours (bench_flex_cuda) against PyTorch's compiled flex_attention (bench/flex_vs_torch.py) on the same cases,
# in one go, printed as ONE table with the ratios ours / PyTorch (and ours / cuDNN SDPA on no mask and causal);
# then our cold and cached JIT compile times.
# Builds nothing: BUILD_DIR must hold a built bench_flex_cuda.
#
#   bench/run_flex_bench.sh BUILD_DIR [--case NAME ...] [--reps N]
#
# Environment: TORCH_CSV (a CSV flex_vs_torch.py wrote earlier on this machine: reused instead of running PyTorch
# again), PYTHON (default /opt/torch/.venv/bin/python when present, else python3), LOG_DIR (where the two
# programs' own outputs and CSVs are kept; default a fresh temporary directory, printed at the end), OURS_ARGS
# (extra arguments for bench_flex_cuda alone, e.g. "--device cpu --small" for a smoke run of the script).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
build=${1:?usage: run_flex_bench.sh BUILD_DIR [--case NAME ...] [--reps N]}
shift
bin=$build/bench_flex_cuda
[ -x "$bin" ] || { echo "run_flex_bench.sh: no $bin (build the bench_flex_cuda target first)" >&2; exit 2; }
if [ -z "${PYTHON:-}" ]; then
  if [ -x /opt/torch/.venv/bin/python ]; then PYTHON=/opt/torch/.venv/bin/python; else PYTHON=python3; fi
fi
log=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log"
jit=$(mktemp -d)  # an empty JIT disk cache: the first process compiles, the second loads
first_case=causal
for a in "$@"; do [ "${prev:-}" = --case ] && first_case=$a && break; prev=$a; done

echo "== ours: first call in a fresh process, empty disk cache (cold compile), then cached" >&2
# On our generated kernels (FLEXGRAD_FLEX_CUDNN=0): on Hopper Auto sends causal to cuDNN, whose first call builds
# a cuDNN graph and compiles none of ours (session 13's table timed that by mistake).
# NVRTC 12.9+ also keeps a cache of its own (a machine that compiled the same text before would time a hit):
# FLEXGRAD_NVRTC_NO_CACHE=1 turns it off for the cold row.
FLEXGRAD_NVRTC_NO_CACHE=1 FLEXGRAD_FLEX_CUDNN=0 FLEXGRAD_CACHE_DIR=$jit "$bin" ${OURS_ARGS:-} --first-call "$first_case" >"$log/compile_cold.txt" 2>&1
FLEXGRAD_FLEX_CUDNN=0 FLEXGRAD_CACHE_DIR=$jit "$bin" ${OURS_ARGS:-} --first-call "$first_case" >"$log/compile_cached.txt" 2>&1
echo "== ours" >&2
FLEXGRAD_CACHE_DIR=$jit "$bin" ${OURS_ARGS:-} --csv "$log/ours.csv" "$@" 2>&1 | tee "$log/ours.txt" >&2
ours_rc=$?
if [ -n "${TORCH_CSV:-}" ] && [ -f "$TORCH_CSV" ]; then
  # PyTorch's half was timed earlier on this machine (tools/device_flex.sh times it while we build).
  echo "== PyTorch: results of $TORCH_CSV" >&2
  cp "$TORCH_CSV" "$log/torch.csv"
  torch_rc=0
else
  echo "== PyTorch" >&2
  PYTHONUNBUFFERED=1 "$PYTHON" "$here/flex_vs_torch.py" --csv "$log/torch.csv" "$@" 2>&1 | tee "$log/torch.txt" >&2
  torch_rc=$?
fi

python3 - "$log" <<'EOF'
import csv, os, sys
log = sys.argv[1]
def rows(name):
    path = os.path.join(log, name)
    return {r["case"]: r for r in csv.DictReader(open(path))} if os.path.exists(path) else {}
ours, torch = rows("ours.csv"), rows("torch.csv")
order = list(dict.fromkeys(list(ours) + list(torch)))  # ours runs every case, in the table order
fmt = "{:<16} {:<9} {:>8} {:>10} {:>10} {:>6} {:>10} {:>10} {:>6} {:>10} {:>6} {:>10} {:>6}"
print(fmt.format("case", "dtype", "density", "ours fwd", "torch fwd", "ratio", "ours bwd", "torch bwd", "ratio",
                 "cuDNN fwd", "ratio", "cuDNN bwd", "ratio"))
print(fmt.format("", "", "", "TFLOP/s", "TFLOP/s", "", "TFLOP/s", "TFLOP/s", "", "TFLOP/s", "", "TFLOP/s", ""))
def num(r, k):
    return float(r[k]) if r else None
for c in order:
    o, t = ours.get(c), torch.get(c)
    cells = []
    for k in ("fwd_tflops", "bwd_tflops"):
        a, b = num(o, k), num(t, k)
        cells += ["failed" if a is None else f"{a:.1f}", "failed" if b is None else f"{b:.1f}",
                  f"{a / b:.2f}" if a and b else "-"]
    for k, mine in (("cudnn_fwd_tflops", "fwd_tflops"), ("cudnn_bwd_tflops", "bwd_tflops")):
        a, b = num(o, mine), (float(t[k]) if t and t.get(k) else None)
        cells += ["-" if b is None else f"{b:.1f}", f"{a / b:.2f}" if a and b else "-"]
    r = o or t
    dens = f"{float(r['density']) * 100:.1f}%"
    if o and t and abs(float(o["density"]) - float(t["density"])) > 1e-9:
        dens += " !"  # the two BlockMasks visit different blocks: the rows are not comparable
    print(fmt.format(c, r["dtype"], dens, *cells))
for name in ("compile_cold.txt", "compile_cached.txt"):
    print(f"{name[:-4].replace('_', ' ')}: " + " | ".join(l.strip() for l in open(os.path.join(log, name))))
EOF
echo "(logs and CSVs in $log)"
[ "$ours_rc" = 0 ] && [ "$torch_rc" = 0 ]
