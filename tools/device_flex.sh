#!/bin/bash
# FlexAttention on a CUDA machine in two short phases (each fits one device call; the build and the PyTorch
# results of phase `check` are reused by phase `bench` on the same machine). Logs go to $OUT.
#
#   tools/device_flex.sh check   build; PyTorch's compiled flex_attention timed while we build (the GPU is idle
#                                then); every CUDA test binary (8 shards); conformance on the GPU (fp32, bf16)
#   tools/device_flex.sh bench   our benchmark (cold and cached compile, then the timed cases) and the one table
#                                of ours / PyTorch (bench/run_flex_bench.sh's table)
#
# Dependencies the machine lacks come from third_party/tp.tgz; the conformance data from
# FLEXGRAD_CONFORMANCE_DIR (default ../shared/conformance).
set -u -o pipefail
OUT=${OUT:-$PWD/device_logs}
B=${BUILD:-/tmp/fgbuild}
mkdir -p "$OUT"
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
conf=${FLEXGRAD_CONFORMANCE_DIR:-../shared/conformance}
phase=${1:-check}

if [ "$phase" = check ]; then
  if [ -f third_party/tp.tgz ]; then
    mkdir -p /tmp/tp && tar xzf third_party/tp.tgz -C /tmp/tp && cp -rn /tmp/tp/. / && ldconfig
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/summary.txt" 2>&1
  # PyTorch first, alone on the GPU, while our build keeps only the CPUs busy.
  ( PYTHONUNBUFFERED=1 timeout 420 $PY bench/flex_vs_torch.py --csv /tmp/torch.csv > /tmp/torch.txt 2>&1 ) &
  torch_pid=$!
  start=$(date +%s)
  { cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
    ninja -C "$B" -j16 flexgrad test_cuda test_attention flexgrad_conformance bench_flex_cuda; } > "$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; exit 1; }
  echo "build: $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
  wait $torch_pid
  echo "torch bench rc=$? at $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
  cp /tmp/torch.csv /tmp/torch.txt "$OUT/" 2>/dev/null
  export FLEXGRAD_CACHE_DIR=/tmp/fgcache
  for i in $(seq 0 7); do
    GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i OMP_NUM_THREADS=2 timeout 300 "$B/test_cuda" > /tmp/shard$i.log 2>&1 &
  done
  wait
  cat /tmp/shard*.log > "$OUT/test_cuda.log"
  echo "test_cuda: $(grep -hE '^\[  PASSED  \]' /tmp/shard*.log | awk '{s+=$4} END {print s+0}') passed, \
$(grep -hcE '^\[  FAILED  \] [A-Za-z]' /tmp/shard*.log | awk '{s+=$1} END {print s+0}') failed lines, \
$(grep -hE '^\[  SKIPPED \] [0-9]' /tmp/shard*.log | awk '{s+=$4} END {print s+0}') skipped" >> "$OUT/summary.txt"
  grep -hE '^\[  FAILED  \] [A-Za-z]' /tmp/shard*.log | grep -v ' ms)' | sort -u >> "$OUT/summary.txt"
  for dt in float32 bfloat16; do
    timeout 200 "$B/flexgrad_conformance" "$conf" --device cuda --dtype $dt > "$OUT/conformance_cuda_$dt.txt" 2>&1
    echo "conformance cuda $dt rc=$? $(tail -1 "$OUT/conformance_cuda_$dt.txt")" >> "$OUT/summary.txt"
  done
  echo "check done: $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
  cat "$OUT/summary.txt"
  grep -hE "Failure|Expected|Which is|error" /tmp/shard*.log | head -30
elif [ "$phase" = bench ]; then
  TORCH_CSV=/tmp/torch.csv LOG_DIR=$OUT timeout 500 bench/run_flex_bench.sh "$B" > "$OUT/flex_bench.txt" 2> "$OUT/flex_bench_log.txt"
  echo "run_flex_bench rc=$?"
  cat "$OUT/flex_bench.txt"
else
  echo "usage: tools/device_flex.sh check|bench" >&2
  exit 2
fi
