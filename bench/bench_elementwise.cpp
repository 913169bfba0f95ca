// Elementwise throughput on the CPU: a large f32 add (GB/s counting bytes read and written), a broadcast
// add, a unary exp and a strided (transposed) add, through the op layer as users call it.
#include <benchmark/benchmark.h>

#include "flexgrad/ops/ops.h"

using namespace fg;

static void BM_AddF32(benchmark::State& state) {
  const int64_t n = state.range(0);
  Tensor a = rand({n}), b = rand({n});
  for (auto _ : state) benchmark::DoNotOptimize(add(a, b).data_ptr());
  state.counters["GB/s"] = benchmark::Counter(3.0 * 4 * n * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_AddF32)->Arg(1 << 20)->Arg(1 << 24)->Arg(1 << 26)->UseRealTime();

static void BM_BroadcastAddF32(benchmark::State& state) {
  Tensor a = rand({4096, 4096}), b = rand({4096});
  for (auto _ : state) benchmark::DoNotOptimize(add(a, b).data_ptr());
  state.counters["GB/s"] = benchmark::Counter(2.0 * 4 * a.numel() * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_BroadcastAddF32)->UseRealTime();

static void BM_ExpF32(benchmark::State& state) {
  Tensor a = rand({1 << 24});
  for (auto _ : state) benchmark::DoNotOptimize(exp(a).data_ptr());
  state.counters["GB/s"] = benchmark::Counter(2.0 * 4 * a.numel() * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ExpF32)->UseRealTime();

static void BM_StridedAddF32(benchmark::State& state) {
  Tensor a = rand({4096, 4096}), b = rand({4096, 4096});
  Tensor at = a.t();
  for (auto _ : state) benchmark::DoNotOptimize(add(at, b).data_ptr());
  state.counters["GB/s"] = benchmark::Counter(3.0 * 4 * a.numel() * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_StridedAddF32)->UseRealTime();

BENCHMARK_MAIN();
