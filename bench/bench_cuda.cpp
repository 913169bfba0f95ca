// CUDA throughput of flexgrad ops against the device's own copy bandwidth and cuBLAS called directly.
// Prints a table; every figure is the mean of timed repetitions after warm-up, timed with CUDA events on
// flexgrad's current stream. Bandwidth counts bytes read + written.
#include <cstdio>
#include <functional>

#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#ifdef FLEXGRAD_WITH_CUDA
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

#ifdef FLEXGRAD_WITH_CUDA
namespace {
using namespace fg;

double time_ms(const std::function<void()>& f, int iters = 20) {
  auto s = static_cast<cudaStream_t>(cuda::current_stream());
  for (int i = 0; i < 3; ++i) f();
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  cudaEventRecord(a, s);
  for (int i = 0; i < iters; ++i) f();
  cudaEventRecord(b, s);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a), cudaEventDestroy(b);
  return ms / iters;
}
}  // namespace

int main() {
  if (device_count(DeviceType::CUDA) == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  cudaDeviceProp prop{};
  cudaGetDeviceProperties(&prop, 0);
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  const int64_t n = (int64_t{256} << 20) / 4;  // 256 MiB of float32
  const double mib = 256.0 * (1 << 20);
  auto cuda_f32 = TensorOptions().dtype(kFloat32).device(kCUDA);
  Generator gen(1);
  Tensor a = rand({n}, cuda_f32, &gen), b = rand({n}, cuda_f32, &gen);
  Tensor c = empty({n}, cuda_f32);
  auto s = static_cast<cudaStream_t>(cuda::current_stream());

  double copy_ms = time_ms([&] { cudaMemcpyAsync(c.data_ptr(), a.data_ptr(), mib, cudaMemcpyDeviceToDevice, s); });
  double copy_bw = 2 * mib / (copy_ms * 1e-3) / 1e9;
  std::printf("\n%-34s %10s %12s %14s\n", "op (float32 unless noted)", "time ms", "GB/s", "of D2D copy");
  std::printf("%-34s %10.3f %12.1f %13.1f%%\n", "D2D copy 256 MiB (cudaMemcpy)", copy_ms, copy_bw, 100.0);

  auto row = [&](const char* name, double ms, double bytes) {
    double bw = bytes / (ms * 1e-3) / 1e9;
    std::printf("%-34s %10.3f %12.1f %13.1f%%\n", name, ms, bw, 100 * bw / copy_bw);
  };
  Tensor out;
  row("add 256 MiB + 256 MiB -> 256 MiB", time_ms([&] { out = add(a, b); }), 3 * mib);
  Tensor a2 = a.reshape({16384, 4096});
  row("softmax rows [16384, 4096]", time_ms([&] { out = softmax(a2, 1); }), 2 * mib);
  Tensor a3 = a.reshape({65536, 1024});
  row("softmax rows [65536, 1024]", time_ms([&] { out = softmax(a3, 1); }), 2 * mib);
  row("sum of 256 MiB (all elements)", time_ms([&] { out = sum(a); }), mib);
  row("sum rows [16384, 4096] dim 1", time_ms([&] { out = sum(a2, {1}); }), mib);

  // bf16 GEMM 8192^3: flexgrad matmul vs cublasGemmEx on the same buffers.
  const int64_t m = 8192;
  Tensor x = randn({m, m}, TensorOptions().dtype(kBFloat16).device(kCUDA), &gen);
  Tensor y = randn({m, m}, TensorOptions().dtype(kBFloat16).device(kCUDA), &gen);
  Tensor z = empty({m, m}, TensorOptions().dtype(kBFloat16).device(kCUDA));
  const double flop = 2.0 * m * m * m;
  double ours = time_ms([&] { out = matmul(x, y); }, 10);
  cublasHandle_t h;
  cublasCreate(&h);
  cublasSetStream(h, s);
  float one = 1, zero = 0;
  double direct = time_ms([&] {
    cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, &one, y.data_ptr(), CUDA_R_16BF, m, x.data_ptr(), CUDA_R_16BF, m,
                 &zero, z.data_ptr(), CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  }, 10);
  cublasDestroy(h);
  bool same = equal(out, z);
  std::printf("\n%-34s %10s %12s\n", "bf16 GEMM 8192^3", "time ms", "TFLOP/s");
  std::printf("%-34s %10.3f %12.1f\n", "flexgrad matmul", ours, flop / (ours * 1e-3) / 1e12);
  std::printf("%-34s %10.3f %12.1f\n", "cublasGemmEx direct", direct, flop / (direct * 1e-3) / 1e12);
  std::printf("flexgrad / direct time: %.3f (results bitwise equal: %s)\n", ours / direct, same ? "yes" : "no");
  return 0;
}
#else
int main() {
  std::printf("flexgrad was built without CUDA: nothing to measure\n");
  return 0;
}
#endif
