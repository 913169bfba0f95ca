#!/bin/bash
# One device run for the CUDA flex forward (from the worktree root, on the GPU machine): build, the
# FlexForwardCuda tests (8 shards in parallel so the NVRTC compiles overlap), our benchmark against
# PyTorch's compiled flex_attention (timed one after the other, never together), register / spill /
# HMMA report of the compiled modules. Logs go to $OUT.
#   FILTER=gtest filter (default: every FlexForwardCuda test)   BENCH=0: tests only (no benchmarks)
#   TILES="BM,BN,WARPS,MIN_BLOCKS ..." bf16 tile variants to time besides the default
set -o pipefail
OUT=${OUT:-/tmp/fwd_out}
B=${BUILD:-/tmp/b}
mkdir -p "$OUT"
export FLEXGRAD_CACHE_DIR=/tmp/fgcache
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
rm -f /tmp/go
[ "${BENCH:-1}" = 0 ] && touch /tmp/go  # nothing waits for it
[ "${BENCH:-1}" = 0 ] || ( timeout 400 $PY bench/bench_flex_forward_torch.py /tmp/go > "$OUT/torch.log" 2>&1 ) &
TORCH=$!
{ cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
  ninja -C $B -j16 flexgrad test_cuda bench_flex_forward_cuda; } > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; touch /tmp/go; exit 1; }
echo "build ok $(date +%T)"
SHARDS=()
for i in $(seq 0 7); do
  GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout 300 $B/test_cuda --gtest_filter="${FILTER:-*FlexForwardCuda*}" > /tmp/shard$i.log 2>&1 &
  SHARDS+=($!)
done
wait "${SHARDS[@]}"
cat /tmp/shard*.log > "$OUT/tests.log"
grep -hE "^\[  (PASSED|FAILED|SKIPPED) |^\[  FAILED  \]" /tmp/shard*.log | sort | uniq -c
grep -hE "Failure|error|Expected|element|out$|lse$|max_scores$|Which is" /tmp/shard*.log | head -40
echo "tests done $(date +%T)"
touch /tmp/go
[ "${BENCH:-1}" = 0 ] && exit 0
wait $TORCH
cat "$OUT/torch.log" | grep -v Warning | tail -8
{ $B/bench_flex_forward_cuda
  for t in ${TILES:-128,64,8,1 128,64,8,2 128,32,8,1 64,32,2,2}; do
    echo "tile $t"; FLEXGRAD_FLEX_FWD_TILE=$t $B/bench_flex_forward_cuda --case bf16_nomask
    FLEXGRAD_FLEX_FWD_TILE=$t $B/bench_flex_forward_cuda --case bf16_causal; done; } 2>&1 | tee "$OUT/bench.log"
for f in $FLEXGRAD_CACHE_DIR/*; do
  echo "== $f"; cuobjdump -res-usage "$f" 2>/dev/null | grep -E "Function|REG"
  echo "HMMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c HMMA) FFMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c FFMA) DFMA $(cuobjdump -sass "$f" 2>/dev/null | grep -c DFMA) LDL $(cuobjdump -sass "$f" 2>/dev/null | grep -c LDL)"
done > "$OUT/sass.txt" 2>&1
grep -B1 -A2 "flex_fwd" "$OUT/sass.txt" | head -60
