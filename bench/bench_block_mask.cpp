// create_block_mask on CUDA against the CPU path, with the shapes of bench_block_mask_torch.py (PyTorch's
// create_block_mask on the same device, same masks). Each figure is the median over repeated calls after
// warm-up of the wall time of one call through to a synchronised device (what a caller waits for:
// tracing, code generation, the cached module lookup, the kernels), plus the device time of one call
// measured with CUDA events (median too). Cold = the first call in the process (NVRTC compile or disk
// cache load included).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "flexgrad/attention/block_mask.h"
#ifdef FLEXGRAD_WITH_CUDA
#include <cuda_runtime.h>

#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

#ifdef FLEXGRAD_WITH_CUDA
namespace {
using namespace fg;
using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct Timing {
  double cold_ms, wall_ms, device_ms;
};

Timing time_call(const std::function<void()>& f, Device d, int warmup, int iters) {
  Timing t{};
  auto t0 = Clock::now();
  f();
  if (d.is_cuda()) cuda::synchronize(d.index);
  t.cold_ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  for (int i = 0; i < warmup; ++i) f();
  if (d.is_cuda()) cuda::synchronize(d.index);
  std::vector<double> wall, dev;
  cudaEvent_t a, b;
  cudaEventCreate(&a), cudaEventCreate(&b);
  auto s = static_cast<cudaStream_t>(cuda::current_stream());
  for (int i = 0; i < iters; ++i) {
    auto w0 = Clock::now();
    if (d.is_cuda()) cudaEventRecord(a, s);
    f();
    if (d.is_cuda()) {
      cudaEventRecord(b, s);
      cudaEventSynchronize(b);
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      dev.push_back(ms);
    }
    wall.push_back(std::chrono::duration<double, std::milli>(Clock::now() - w0).count());
  }
  cudaEventDestroy(a), cudaEventDestroy(b);
  t.wall_ms = median(wall);
  t.device_ms = dev.empty() ? 0 : median(dev);
  return t;
}

Expr causal(Expr, Expr, Expr q, Expr kv) { return q >= kv; }

// Documents of these lengths (sum 4096), as in bench_block_mask_torch.py.
Tensor doc_ids(Device d) {
  const std::vector<int64_t> lengths = {512, 256, 1024, 128, 640, 384, 896, 256};
  std::vector<int64_t> ids;
  for (size_t i = 0; i < lengths.size(); ++i) ids.insert(ids.end(), lengths[i], static_cast<int64_t>(i));
  return from_vector(ids, {static_cast<int64_t>(ids.size())}, kInt64).to(d);
}

}  // namespace

int main() {
  if (device_count(DeviceType::CUDA) == 0) {
    std::printf("no CUDA device: nothing to measure\n");
    return 0;
  }
  const int64_t S = 4096;
  struct Case {
    const char* name;
    std::optional<int64_t> B, H;
    bool document;
  };
  const Case cases[] = {{"causal B=None H=None", std::nullopt, std::nullopt, false},
                        {"causal B=4 H=16", 4, 16, false},
                        {"document B=None H=None", std::nullopt, std::nullopt, true},
                        {"document B=4 H=16", 4, 16, true}};
  std::printf("create_block_mask S=%lld BLOCK_SIZE=128 (ms; median of 200 after 20 warm-up; jit cache dir '%s')\n",
              static_cast<long long>(S), cuda::jit::cache_dir().c_str());
  std::printf("%-24s %10s %10s %10s %10s %9s\n", "case", "cuda cold", "cuda wall", "cuda dev", "cpu wall", "sparsity");
  for (const Case& c : cases) {
    Tensor doc_cuda = doc_ids(kCUDA), doc_cpu = doc_ids(kCPU);
    auto make = [&](Device d) {
      if (!c.document) return create_block_mask(causal, c.B, c.H, S, S, 128, d);
      Captured doc(d.is_cuda() ? doc_cuda : doc_cpu, "doc");
      return create_block_mask([doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); },
                               c.B, c.H, S, S, 128, d);
    };
    Timing g = time_call([&] { make(kCUDA); }, kCUDA, 20, 200);
    Timing h = time_call([&] { make(kCPU); }, kCPU, 3, 20);
    std::printf("%-24s %10.3f %10.3f %10.3f %10.3f %8.2f%%\n", c.name, g.cold_ms, g.wall_ms, g.device_ms, h.wall_ms,
                make(kCUDA).sparsity());
  }
  const cuda::jit::JitStats st = cuda::jit::stats();
  std::printf("jit: %llu compiles (%.3f s), %llu memory hits, %llu disk hits\n",
              static_cast<unsigned long long>(st.compiles), st.compile_seconds,
              static_cast<unsigned long long>(st.memory_hits), static_cast<unsigned long long>(st.disk_hits));
  return 0;
}
#else
int main() {
  std::printf("flexgrad was built without CUDA: nothing to measure\n");
  return 0;
}
#endif
