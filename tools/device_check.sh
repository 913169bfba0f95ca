#!/bin/bash
# Builds flexgrad for sm_90a and runs every test binary and bench_cuda on a CUDA machine, writing
# build.log, tests.log (all binaries), summary.txt and bench.txt to $OUT (default ./device_logs).
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
cat "$OUT/summary.txt" "$OUT/bench.txt"
