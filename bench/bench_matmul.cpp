// matmul throughput: square f32 / f64 products at 512, 1024 and 2048 through fg::matmul (OpenBLAS on
// CPU), reported as GFLOP/s (2 n^3 flops per product).
#include <benchmark/benchmark.h>

#include "flexgrad/ops/ops.h"

namespace {

void BM_Matmul(benchmark::State& state, fg::DType dtype) {
  const int64_t n = state.range(0);
  // Deterministic dense operands (values in [-1, 1]); the timing does not depend on the values.
  fg::Tensor i = fg::arange(0, static_cast<double>(n * n), 1, fg::kFloat64).view({n, n});
  fg::Tensor a = fg::sin(i * 0.37).to(dtype), b = fg::cos(i * 0.53).to(dtype);
  for (auto _ : state) {
    fg::Tensor c = fg::matmul(a, b);
    benchmark::DoNotOptimize(c.data_ptr());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * n * n * 1e-9 * static_cast<double>(state.iterations()),
                                                 benchmark::Counter::kIsRate);
}

BENCHMARK_CAPTURE(BM_Matmul, f32, fg::kFloat32)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, f64, fg::kFloat64)->Arg(512)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
