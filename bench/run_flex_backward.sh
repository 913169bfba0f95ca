#!/usr/bin/env bash
# On the device machine, from the repository root: build, run the CUDA flex backward tests, then time
# ours against PyTorch's compiled flex backward. Logs under $OUT (or /tmp/flexbwd).
# Usage: bench/run_flex_backward.sh [gtest filter]
set -o pipefail
OUT=${OUT:-/tmp/flexbwd}
FILTER=${1:-'FlexBackwardCuda.*'}
B=/tmp/b
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a >$OUT/cmake.log 2>&1 || { tail -30 $OUT/cmake.log; exit 1; }
ninja -C $B -j16 flexgrad test_cuda >$OUT/build.log 2>&1 || { grep -E "error|Error" -A5 $OUT/build.log | head -80; exit 1; }
export FLEXGRAD_CACHE_DIR=/tmp/fgcache
$B/test_cuda --gtest_filter="$FILTER" 2>&1 | tee $OUT/test.log | grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error|Expected|Which is|actual|^  |dcap|dq|dk|dv" | head -120
grep -E "tests ran|PASSED|FAILED" $OUT/test.log | tail -5
if [ -n "$SANITIZE" ]; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --print-limit 20 $B/test_cuda --gtest_filter="$SANITIZE" >$OUT/san_$tool.log 2>&1
    echo "compute-sanitizer $tool on '$SANITIZE': exit $?"; grep -E "ERROR SUMMARY|Invalid|Race|hazard" $OUT/san_$tool.log | head -5
  done
fi
if [ -n "$BENCH" ]; then
  $B/test_cuda --gtest_also_run_disabled_tests --gtest_filter='*DISABLED_BenchBf16' 2>&1 | tee $OUT/bench.log | grep -E "flexgrad bwd|FAILED"
  PYTHONUNBUFFERED=1 python3 bench/flex_backward_vs_torch.py 2>&1 | tee $OUT/torch.log | grep -E "torch|Error|error" | head
fi
