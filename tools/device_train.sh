#!/bin/bash
# GPU training on a CUDA machine in one call: the GPU instances of the nn suite, then train_tiny_gpt against
# its PyTorch twin (bench/train_tiny_gpt_torch.py) on the same model, batch and data, one table of tokens/s
# and peak GPU memory with ratios. Logs under $OUT (default ./device_logs).
#
#   tools/device_train.sh BUILD_DIR
#
# BUILD_DIR holds built binaries (libflexgrad.so, train_tiny_gpt, test_nn). Environment: DATA (training text;
# default /usr/share/common-licenses/GPL-3), STEPS (default "tests bench"), BENCH_STEPS (steps per run,
# default 30; the median step after the first five is reported), GPT2_BATCH (default 8 sequences of 1024).
set -u -o pipefail
OUT=${OUT:-$PWD/device_logs}
L=/tmp/train_logs
mkdir -p "$OUT" "$L"
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
B=${1:?usage: tools/device_train.sh BUILD_DIR}
data=${DATA:-/usr/share/common-licenses/GPL-3}
steps=${STEPS:-tests bench}
n=${BENCH_STEPS:-30}
gb=${GPT2_BATCH:-8}
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$L/summary.txt"; tar czf "$L/logs.tgz" -C "$L" . 2>/dev/null; }
export LD_LIBRARY_PATH=$B${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export FLEXGRAD_CACHE_DIR=${FLEXGRAD_CACHE_DIR:-/tmp/fgcache}

case " $steps " in *" tests "*)
  OMP_NUM_THREADS=4 timeout 300 "$B/test_nn" --gtest_filter='*CUDA*:*Cuda*:*cuda*' > "$L/test_nn_cuda.log" 2>&1
  t "test_nn (GPU instances) rc=$? $(grep -E '^\[  (PASSED|FAILED) ' "$L/test_nn_cuda.log" | head -2 | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]' "$L/test_nn_cuda.log" | sort -u | tee -a "$L/summary.txt"
esac

case " $steps " in *" bench "*)
  # name | our flags | PyTorch flags (the same model, batch and precision)
  runs=(
    "tiny-fp32|--device cuda|--device cuda"
    "tiny-bf16|--device cuda --precision bf16|--device cuda --precision bf16"
    "gpt2s-bf16|--device cuda --precision bf16 --preset gpt2-small --batch $gb|--device cuda --precision bf16 --preset gpt2-small --batch $gb"
  )
  common_ours="--data $data --steps $n --eval-every 1000000 --eval-batches 1 --sample-len 0 --quiet --out /tmp/train_out"
  common_torch="--data $data --steps $n"
  for r in "${runs[@]}"; do
    IFS='|' read -r name ours theirs <<< "$r"
    timeout 300 "$B/train_tiny_gpt" $common_ours $ours > "$L/ours_$name.txt" 2>&1
    t "ours $name rc=$? $(grep 'steady state' "$L/ours_$name.txt")"
    for att in sdpa flex; do
      extra=""; [ $att = flex ] && extra="--compile"
      PYTHONUNBUFFERED=1 timeout 400 $PY bench/train_tiny_gpt_torch.py $common_torch $theirs --attention $att $extra \
        > "$L/torch_${name}_$att.txt" 2>&1
      t "torch $name $att rc=$? $(grep -E '^torch ' "$L/torch_${name}_$att.txt" | sed 's/.*: median/median/')"
    done
  done
  # One table: tokens/s and peak GPU memory, ours against eager SDPA and compiled flex_attention.
  $PY - "$L" <<'EOF' | tee "$L/train_bench.txt"
import re, sys, pathlib
L = pathlib.Path(sys.argv[1])
def parse(p):
    if not p.exists(): return None, None
    s = p.read_text()
    tok = re.findall(r"([0-9.]+) tokens/s", s)
    mem = re.findall(r"peak GPU memory ([0-9.]+) GiB", s)
    return (float(tok[-1]) if tok and "median" in s else None), (float(mem[-1]) if mem else None)
def f(v, fmt): return fmt.format(v) if v is not None else "n/a"
print("| run | flexgrad tok/s | torch eager SDPA tok/s | ratio | torch.compile + flex tok/s | ratio | peak GiB ours / eager / compile |")
print("| --- | --- | --- | --- | --- | --- | --- |")
for name in ["tiny-fp32", "tiny-bf16", "gpt2s-bf16"]:
    o, om = parse(L / f"ours_{name}.txt")
    e, em = parse(L / f"torch_{name}_sdpa.txt")
    c, cm = parse(L / f"torch_{name}_flex.txt")
    r = lambda a, b: f"{a / b:.2f}" if a and b else "n/a"
    print(f"| {name} | {f(o, '{:.0f}')} | {f(e, '{:.0f}')} | {r(o, e)} | {f(c, '{:.0f}')} | {r(o, c)} | "
          f"{f(om, '{:.2f}')} / {f(em, '{:.2f}')} / {f(cm, '{:.2f}')} |")
EOF
esac
cat "$L/summary.txt"
cp "$L/summary.txt" "$OUT/" 2>/dev/null
cp "$L/train_bench.txt" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$L" .
