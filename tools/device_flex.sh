#!/bin/bash
# FlexAttention on a CUDA machine in one call: CUDA tests, conformance on the GPU, and the benchmark against
# PyTorch's compiled flex_attention (one table). Logs under $OUT (default ./device_logs).
#
#   tools/device_flex.sh [BUILD_DIR]
#
# BUILD_DIR holds built binaries (libflexgrad.so, test_cuda, flexgrad_conformance, bench_flex_cuda), e.g. a
# portable build (-DFLEXGRAD_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=90a) made elsewhere and carried; without
# one, the script builds here. PyTorch compiles its kernels while our tests run (compiling needs CPUs, not
# the GPU); every timing, PyTorch's and ours, runs alone on the GPU afterwards.
# Environment: FLEXGRAD_CONFORMANCE_DIR (default ../shared/conformance), FLEXGRAD_GALLERY_DIR (default
# ../shared/gallery: the conformance step runs it too, and test_cuda reads it); STEPS (default "tests conformance
# bench"; also "paged": PagedAttention's tests on both devices, "decode": the decode-step benchmark against PyTorch
# and its kernels under ncu; "ab": a knob's A/B rounds, below; "none" only unpacks, for a script of one's own to run
# the binaries after it);
# GTEST_FILTER, TEST_TIMEOUT (s a shard, default 300) and TEST_SHARDS (default 8, run side by side) for test_cuda
# (the whole suite cold on an H100: the slowest of 8 shards past 420 s in session 40, of 12 shards 287 s in session 41);
# dependencies the machine lacks from third_party/tp.tgz. What tools/device_pack.sh packed (PACK_DIR, default
# build-device/pack) is used where carried: its bins.tgz when no BUILD_DIR is given, its tp.tgz, and its
# conformance.tgz / gallery.tgz where the variables above are not set.
set -u -o pipefail
# The device tool returns at most 8 files: logs are written to L and packed into $OUT/logs.tgz after each step.
OUT=${OUT:-$PWD/device_logs}
L=/tmp/flex_logs
mkdir -p "$OUT" "$L"
PY=python3
[ -x /opt/torch/.venv/bin/python ] && PY=/opt/torch/.venv/bin/python
PACK=${PACK_DIR:-build-device/pack}
for d in conformance gallery; do
  [ -f "$PACK/$d.tgz" ] && mkdir -p /tmp/fgdata && tar xzf "$PACK/$d.tgz" -C /tmp/fgdata
done
data() { [ -d "/tmp/fgdata/$1" ] && echo "/tmp/fgdata/$1" || (cd "../shared/$1" 2>/dev/null && pwd || echo "../shared/$1"); }
export FLEXGRAD_CONFORMANCE_DIR=${FLEXGRAD_CONFORMANCE_DIR:-$(data conformance)}  # test_cuda reads both
conf=$FLEXGRAD_CONFORMANCE_DIR
export FLEXGRAD_GALLERY_DIR=${FLEXGRAD_GALLERY_DIR:-$(data gallery)}
steps=${STEPS:-tests conformance bench}
start=$(date +%s)
t() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$L/summary.txt"; tar czf "$L/logs.tgz" -C "$L" . 2>/dev/null; }

for tp in third_party/tp.tgz "$PACK/tp.tgz"; do
  if [ -f "$tp" ]; then
    mkdir -p /tmp/tp && tar xzf "$tp" -C /tmp/tp && cp -rn /tmp/tp/. / && ldconfig
    break
  fi
done
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$L/summary.txt" 2>&1
B=${1:-}
if [ -z "$B" ] && [ -f "$PACK/bins.tgz" ]; then
  B=/tmp/fgbins
  mkdir -p "$B" && tar xzf "$PACK/bins.tgz" -C "$B"
  t "binaries of $(cat "$PACK/bins.commit" 2>/dev/null || echo "an unknown commit") ($PACK/bins.tgz)"
fi
if [ -z "$B" ]; then
  B=/tmp/fgbuild
  { cmake -S . -B "$B" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90a &&
    ninja -C "$B" -j16 flexgrad test_cuda flexgrad_conformance bench_flex_cuda; } > "$L/build.log" 2>&1 ||
    { tail -40 "$L/build.log"; exit 1; }
  t "built"
fi
export LD_LIBRARY_PATH=$B${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
# Libraries opened at run time by soname: where the system's loader has no SONAME, the first DIR holding it goes on
# LD_LIBRARY_PATH.
add_lib_dir() {  # SONAME DIR...
  local so=$1; shift
  ldconfig -p 2>/dev/null | grep -q "${so//./\\.} " && return
  for d in "$@"; do [ -e "$d/$so" ] && export LD_LIBRARY_PATH=$LD_LIBRARY_PATH:$d && return; done
  return 0  # none found: the library's own error will name it
}
# FlexBackend::Cudnn opens libcudnn.so.9 (the torch venv's wheel has it); cuBLAS is opened at the first GEMM
# (tensor/cuda/cublas_library.h) by its soname, then by the build machine's path (the toolkit's or the venv's copy).
add_lib_dir libcudnn.so.9 /opt/torch/.venv/lib/python3*/site-packages/nvidia/cudnn/lib
add_lib_dir libcublas.so.13 /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda-13*/lib64 \
  /opt/torch/.venv/lib/python3*/site-packages/nvidia/cu13/lib
export FLEXGRAD_CACHE_DIR=/tmp/fgcache

case " $steps " in *" bench "*)
  # PyTorch's compile, one repetition per case: its kernels land in the inductor/Triton caches on disk.
  ( PYTHONUNBUFFERED=1 timeout 300 $PY bench/flex_vs_torch.py --reps 1 --csv /tmp/torch_warm.csv > "$L/torch_warm.txt" 2>&1 ) &
  warm_pid=$!
esac

case " $steps " in *" tests "*)
  shards=()
  n=${TEST_SHARDS:-8}
  rm -f /tmp/shard*.log  # a warm machine keeps an earlier call's logs, which the counts below would add in
  for i in $(seq 0 $((n - 1))); do
    GTEST_TOTAL_SHARDS=$n GTEST_SHARD_INDEX=$i OMP_NUM_THREADS=2 timeout ${TEST_TIMEOUT:-300} "$B/test_cuda" ${GTEST_FILTER:+--gtest_filter=$GTEST_FILTER} \
      > /tmp/shard$i.log 2>&1 &
    shards+=($!)
  done
  wait "${shards[@]}"
  cat /tmp/shard*.log > "$L/test_cuda.log"
  t "test_cuda: $(grep -hE '^\[  PASSED  \]' /tmp/shard*.log | awk '{s+=$4} END {print s+0}') passed," \
    "$(grep -hE '^\[  FAILED  \] [0-9]+ test' /tmp/shard*.log | awk '{s+=$3} END {print s+0}') failed," \
    "$(grep -hE '^\[  SKIPPED \] [0-9]' /tmp/shard*.log | awk '{s+=$4} END {print s+0}') skipped"
  grep -hE '^\[  FAILED  \] [A-Za-z]' /tmp/shard*.log | grep -v ' ms)' | sort -u | tee -a "$L/summary.txt"
  # A shard that crashed or hit the timeout prints no summary: its unfinished tests are in no count above.
  for i in $(seq 0 $((n - 1))); do
    grep -qE '^\[==========\] [0-9]+ tests? from .* ran\.' /tmp/shard$i.log ||
      t "test_cuda shard $i DID NOT FINISH (crash or TEST_TIMEOUT); last test started: $(grep -E '^\[ RUN' /tmp/shard$i.log | tail -1)"
  done
esac

case " $steps " in *" conformance "*)
  for dt in float32 bfloat16; do
    for set in conformance gallery; do
      dir=$conf
      [ $set = gallery ] && dir=$FLEXGRAD_GALLERY_DIR
      if [ ! -f "$dir/manifest.json" ]; then
        t "$set cuda $dt: NOT RUN, no data at $dir (not carried?)"
        continue
      fi
      timeout 100 "$B/flexgrad_conformance" "$dir" --device cuda --dtype $dt > "$L/${set}_cuda_$dt.txt" 2>&1
      t "$set cuda $dt rc=$? $(tail -1 "$L/${set}_cuda_$dt.txt")"
    done
  done
esac

case " $steps " in *" bench "*)
  wait $warm_pid
  t "PyTorch compiled (rc=$?)"
  PYTHONUNBUFFERED=1 timeout 150 $PY bench/flex_vs_torch.py --csv /tmp/torch.csv > "$L/torch.txt" 2>&1
  t "PyTorch timed (rc=$?)"
  TORCH_CSV=/tmp/torch.csv LOG_DIR=$L timeout 180 bench/run_flex_bench.sh "$B" > "$L/flex_bench.txt" 2> "$L/flex_bench_log.txt"
  t "ours timed (rc=$?)"
  cat "$L/flex_bench.txt"
esac
case " $steps " in *" ab "*)
  # A knob against the defaults on our kernels alone (FLEXGRAD_FLEX_CUDNN=0), in alternating rounds on the same
  # machine: AB_KNOB ("VAR=VALUE ...", required), AB_CASES (default causal_d64_b8), AB_ROUNDS (default 3), AB_ARGS
  # (default "--backend fused --reps 20 --warmup 3"); with AB_NCU=1 also each side's first forward kernel under ncu
  # (registers, occupancy limits, the launch's shared-memory configuration, warps active, time).
  knob=(${AB_KNOB:?STEPS=ab needs AB_KNOB})
  cases=()
  for c in ${AB_CASES:-causal_d64_b8}; do cases+=(--case "$c"); done
  on_side() {  # SIDE COMMAND...: the command on our kernels, with the knob's variables on the knob's side
    local side=$1; shift
    if [ "$side" = knob ]; then env FLEXGRAD_FLEX_CUDNN=0 "${knob[@]}" "$@"; else env FLEXGRAD_FLEX_CUDNN=0 "$@"; fi
  }
  for r in $(seq 1 "${AB_ROUNDS:-3}"); do
    for side in defaults knob; do
      on_side $side timeout 120 "$B/bench_flex_cuda" ${AB_ARGS:---backend fused --reps 20 --warmup 3} "${cases[@]}" \
        > "$L/ab_${side}_$r.txt" 2>&1
      echo "round $r, $side (rc=$?):"; grep -E "^[a-z]" "$L/ab_${side}_$r.txt" | grep -v "^case\|^flexgrad"
    done
  done | tee "$L/ab.txt"
  t "ab: ${AB_KNOB} on ${AB_CASES:-causal_d64_b8}, ${AB_ROUNDS:-3} rounds ($L/ab.txt)"
  if [ "${AB_NCU:-0}" = 1 ]; then
    m=launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem
    m=$m,launch__occupancy_limit_warps,launch__shared_mem_config_size,sm__warps_active.avg.pct_of_peak_sustained_active
    m=$m,gpu__time_duration.sum
    for side in defaults knob; do
      on_side $side timeout 120 /usr/local/cuda/bin/ncu --kernel-name regex:flex_fwd --launch-count 1 --metrics "$m" \
        --csv "$B/bench_flex_cuda" --backend fused --reps 1 --warmup 0 "${cases[@]:0:2}" > "$L/ab_ncu_$side.csv" 2>&1
      t "ncu $side (rc=$?): $(grep -E '"(launch|sm|gpu)__' "$L/ab_ncu_$side.csv" | awk -F'","' '{printf "%s=%s ", $(NF-2), $NF}' | tr -d '"')"
    done
  fi
esac

case " $steps " in *" paged "*)
  # PagedAttention's tests on both devices (test_attention's CUDA instances need the GPU).
  OMP_NUM_THREADS=4 timeout ${TEST_TIMEOUT:-300} "$B/test_attention" --gtest_filter='*Paged*' > "$L/test_paged.log" 2>&1
  t "test_attention *Paged* rc=$? $(grep -E '^\[  (PASSED|FAILED|SKIPPED) ' "$L/test_paged.log" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]' "$L/test_paged.log" | sort -u | tee -a "$L/summary.txt"
esac

case " $steps " in *" decode "*)
  # The decode step (bench_decode_cuda) and PyTorch's on the same shapes, then the kernels alone under ncu.
  timeout 240 "$B/bench_decode_cuda" --csv "$L/decode.csv" > "$L/decode.txt" 2>&1
  t "ours decode (rc=$?)"
  PYTHONUNBUFFERED=1 timeout 240 $PY bench/decode_vs_torch.py --csv "$L/decode_torch.csv" > "$L/decode_torch.txt" 2>&1
  t "PyTorch decode (rc=$?)"
  timeout 240 /usr/local/cuda/bin/ncu --kernel-name regex:'flex_decode|flex_fwd' --metrics gpu__time_duration.sum --csv \
    "$B/bench_decode_cuda" --reps 1 --iters 1 > "$L/decode_ncu.csv" 2> "$L/decode_ncu.err"
  t "ncu decode kernels (rc=$?)"
  cat "$L/decode.txt" "$L/decode_torch.txt"
esac

cat "$L/summary.txt"
cp "$L/summary.txt" "$L/flex_bench.txt" "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$L" .
