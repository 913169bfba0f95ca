#!/bin/bash
# Builds flexgrad for sm_90a and runs every test binary, bench_cuda and the conformance cases on the GPU on a
# CUDA machine, writing build.log, tests.log (all binaries), summary.txt, bench.txt and conformance_cuda_*.txt
# to $OUT (default ./device_logs); with FLEX_BENCH=1 also flex_bench.txt (bench/run_flex_bench.sh).
# Dependencies missing on the machine may come as third_party/tp.tgz (a tarball rooted at /);
# FLEXGRAD_CONFORMANCE_DIR may point at a copy of the conformance data.
set -u
OUT=${OUT:-$PWD/device_logs}
mkdir -p "$OUT"
JOBS=${JOBS:-16}
if [ -f third_party/tp.tgz ]; then
  mkdir -p /tmp/tp && tar xzf third_party/tp.tgz -C /tmp/tp && cp -rn /tmp/tp/. / && ldconfig
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  nvcc --version | tail -2
} > "$OUT/summary.txt" 2>&1
start=$(date +%s)
if ! { cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
       ninja -C build -j"$JOBS"; } > "$OUT/build.log" 2>&1; then
  tail -60 "$OUT/build.log"
  exit 1
fi
echo "build: $(( $(date +%s) - start )) s" >> "$OUT/summary.txt"
for t in build/test_*; do
  [ -x "$t" ] || continue
  name=$(basename "$t")
  echo "===== $name" >> "$OUT/tests.log"
  OMP_NUM_THREADS=8 timeout "${TEST_TIMEOUT:-300}" "$t" ${GTEST_ARGS:-} > "/tmp/$name.log" 2>&1
  rc=$?
  cat "/tmp/$name.log" >> "$OUT/tests.log"
  echo "$name rc=$rc $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "/tmp/$name.log" | tr '\n' ' ')" >> "$OUT/summary.txt"
  grep -E '^\[  FAILED  \] [A-Za-z]' "/tmp/$name.log" | sort -u >> "$OUT/summary.txt"
done
timeout 180 build/bench_cuda > "$OUT/bench.txt" 2>&1
echo "bench_cuda rc=$?" >> "$OUT/summary.txt"
# PyTorch's conformance cases on the GPU, float32 and bfloat16 (tables in conformance_cuda_*.txt).
conf=${FLEXGRAD_CONFORMANCE_DIR:-../shared/conformance}
if [ -f "$conf/manifest.json" ]; then
  for dt in float32 bfloat16; do
    timeout 300 build/flexgrad_conformance "$conf" --device cuda --dtype $dt > "$OUT/conformance_cuda_$dt.txt" 2>&1
    echo "conformance cuda $dt rc=$? $(tail -1 "$OUT/conformance_cuda_$dt.txt")" >> "$OUT/summary.txt"
  done
fi
# FLEX_BENCH=1: ours against PyTorch's compiled flex_attention, one table (bench/run_flex_bench.sh).
if [ "${FLEX_BENCH:-0}" = 1 ]; then
  LOG_DIR=/tmp/flex_bench timeout 480 bench/run_flex_bench.sh build > "$OUT/flex_bench.txt" 2> "$OUT/flex_bench_log.txt"
  echo "run_flex_bench rc=$?" >> "$OUT/summary.txt"
  cat "$OUT/flex_bench.txt"
fi
cat "$OUT/summary.txt" "$OUT/bench.txt"
