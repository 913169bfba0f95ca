// Times flexgrad's fused FlexAttention forward on CUDA (CUDA events, after warm-up, median of runs) for the
// shapes issue 9 compares with PyTorch; bench/bench_flex_forward_torch.py prints PyTorch's numbers for the
// same shapes. TFLOP/s = 4 * B * H * S * S * D * density (density 0.5 for causal).
//
//   bench_flex_forward_cuda [--iters N] [--case NAME]
#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "attention/flex_attention.h"
#include "attention/cuda/jit.h"
#include "tensor/cuda/cuda_api.h"
#include "tensor/random.h"

using namespace fg;

namespace {

struct BenchCase {
  const char* name;
  DType dt;
  int64_t B, H, S, D;
  bool causal;
};

Expr causal_mask(Expr, Expr, Expr q, Expr kv) { return q >= kv; }

// BlockMask lists moved to the device once, so calls do not copy them.
BlockMask on_device(BlockMask m, Device d) {
  for (Tensor* t : {&m.kv_num_blocks, &m.kv_indices, &m.full_kv_num_blocks, &m.full_kv_indices, &m.q_num_blocks,
                    &m.q_indices, &m.full_q_num_blocks, &m.full_q_indices}) {
    if (t->defined()) *t = t->to(d);
  }
  return m;
}

void run(const BenchCase& c, int iters) {
  const Device dev(DeviceType::CUDA, 0);
  Generator gen(0);
  Tensor q = randn({c.B, c.H, c.S, c.D}, kFloat32, &gen).to(c.dt).to(dev);
  Tensor k = randn({c.B, c.H, c.S, c.D}, kFloat32, &gen).to(c.dt).to(dev);
  Tensor v = randn({c.B, c.H, c.S, c.D}, kFloat32, &gen).to(c.dt).to(dev);
  FlexAttentionOptions o;
  if (c.causal) o.block_mask = on_device(create_block_mask(causal_mask, std::nullopt, std::nullopt, c.S, c.S), dev);
  cuda::synchronize(0);
  auto t0 = std::chrono::steady_clock::now();
  flex_attention(q, k, v, o);  // compiles (or loads from the disk cache)
  cuda::synchronize(0);
  const double first_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  for (int i = 0; i < 3; ++i) flex_attention(q, k, v, o);
  auto stream = static_cast<cudaStream_t>(cuda::current_stream(0));
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> ms;
  for (int i = 0; i < iters; ++i) {
    cudaEventRecord(a, stream);
    flex_attention(q, k, v, o);
    cudaEventRecord(b, stream);
    cudaEventSynchronize(b);
    float t = 0;
    cudaEventElapsedTime(&t, a, b);
    ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2];
  const double flops = 4.0 * c.B * c.H * double(c.S) * c.S * c.D * (c.causal ? 0.5 : 1.0);
  std::printf("%-22s %-8s B=%ld H=%ld S=%ld D=%ld  median %.3f ms (min %.3f)  %.1f TFLOP/s  first call %.0f ms\n", c.name,
              dtype_name(c.dt), (long)c.B, (long)c.H, (long)c.S, (long)c.D, med, ms.front(), flops / med * 1e-9,
              first_ms);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flexgrad fused FlexAttention forward on CUDA"};
  int iters = 30;
  std::string only;
  app.add_option("--iters", iters, "timed calls per case");
  app.add_option("--case", only, "run only this case");
  CLI11_PARSE(app, argc, argv);
  if (device_count(DeviceType::CUDA) == 0) {
    std::printf("no CUDA device\n");
    return 1;
  }
  const BenchCase cases[] = {
      {"bf16_nomask", kBFloat16, 4, 16, 4096, 128, false},
      {"bf16_causal", kBFloat16, 4, 16, 4096, 128, true},
      {"bf16_causal_d64", kBFloat16, 8, 16, 4096, 64, true},
      {"f16_causal", kFloat16, 4, 16, 4096, 128, true},
      {"f32_causal", kFloat32, 8, 8, 1024, 64, true},
  };
  for (const BenchCase& c : cases) {
    if (!only.empty() && only != c.name) continue;
    run(c, iters);
  }
  return 0;
}
