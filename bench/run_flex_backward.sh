#!/usr/bin/env bash
# One device run for the CUDA flex backward (from the worktree root, on the GPU machine): build, the
# FlexBackwardCuda tests (8 shards in parallel so the NVRTC compiles overlap), optionally
# compute-sanitizer (SANITIZE=<gtest filter>) and the timing of ours against PyTorch's compiled flex
# backward (BENCH=1; PyTorch compiles during our build and times only after our tests), then the
# register / spill / HMMA report of the compiled modules. Logs under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/flexbwd}
B=${BUILD:-/tmp/b}
mkdir -p "$OUT"
export FLEXGRAD_CACHE_DIR=/tmp/fgcache
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
rm -f /tmp/go
if [ -n "$BENCH" ] && [ -z "$NO_TORCH" ]; then
  ( PYTHONUNBUFFERED=1 timeout 400 $PY bench/flex_backward_vs_torch.py /tmp/go > "$OUT/torch.log" 2>&1 ) &
  TORCH=$!
fi
# PREBUILT=<dir with test_cuda and libflexgrad.so> skips the build when those binaries run here.
if [ -n "$PREBUILT" ] && LD_LIBRARY_PATH=$PREBUILT:/usr/local/cuda/lib64 $PREBUILT/test_cuda --gtest_list_tests > /dev/null 2>&1; then
  B=$PREBUILT
  export LD_LIBRARY_PATH=$PREBUILT:/usr/local/cuda/lib64
  echo "prebuilt binaries run here"
else
  { cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
    ninja -C $B -j16 flexgrad test_cuda; } > "$OUT/build.log" 2>&1 || { grep -E "error|Error" -A5 "$OUT/build.log" | head -60; touch /tmp/go; exit 1; }
  echo "build ok $(date +%T)"
fi
SHARDS=()
for i in $(seq 0 7); do
  GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout ${TEST_TIMEOUT:-300} $B/test_cuda --gtest_filter="${FILTER:-FlexBackwardCuda.*}" > /tmp/shard$i.log 2>&1 &
  SHARDS+=($!)
done
wait "${SHARDS[@]}"
cat /tmp/shard*.log > "$OUT/tests.log"
grep -hE "^\[  (PASSED|FAILED|SKIPPED) |^\[       OK \]|^\[  FAILED  \]" /tmp/shard*.log | sort | uniq -c
grep -hE "Failure|rror|Expected|Which is|dcap|^dq|^dk|^dv|Trace|trace|bfloat|float" /tmp/shard*.log | head -60
echo "tests done $(date +%T)"
if [ -n "$SANITIZE" ]; then
  for tool in memcheck racecheck; do
    timeout 200 compute-sanitizer --tool $tool --print-limit 20 $B/test_cuda --gtest_filter="$SANITIZE" > "$OUT/san_$tool.log" 2>&1
    echo "compute-sanitizer $tool on '$SANITIZE': exit $?"; grep -E "ERROR SUMMARY|Invalid|Race|hazard|PASSED|FAILED" "$OUT/san_$tool.log" | head -6
  done
fi
if [ -n "$BENCH" ]; then
  for t in ${TILES:-default}; do  # FLEXGRAD_FLEX_BWD_TILE variants (flex_backward_cuda.cpp)
    echo "tile $t"
    [ "$t" = default ] && unset FLEXGRAD_FLEX_BWD_TILE || export FLEXGRAD_FLEX_BWD_TILE=$t
    timeout 200 $B/test_cuda --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_BenchBf16' 2>&1 | tee -a "$OUT/bench.log" | grep -E "flexgrad bwd|FAILED"
  done
  unset FLEXGRAD_FLEX_BWD_TILE
  touch /tmp/go
  [ -n "$TORCH" ] && wait $TORCH
  grep -E "torch|Error|error" "$OUT/torch.log" | head
fi
touch /tmp/go
for f in $FLEXGRAD_CACHE_DIR/*; do
  echo "== $f"; cuobjdump -res-usage "$f" 2>/dev/null | grep -E "Function|REG"
  echo "HMMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c HMMA) FFMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c FFMA) DFMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c DFMA) LDL $(cuobjdump -sass "$f" 2>/dev/null | grep -c LDL)"
done > "$OUT/sass.txt" 2>&1
grep -A1 "fg_bwd_dkdv\|fg_bwd_dq" "$OUT/sass.txt" | grep -E "REG|HMMA" | sort | uniq -c | head -20
