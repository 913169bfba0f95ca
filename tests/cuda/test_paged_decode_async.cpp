// A decoding step through PagedAttention on CUDA must not wait for the GPU: convert_logical_block_mask of a
// device mask runs on the device, and a launch whose captured reads are proven in range (attention/
// int_ranges.h) has no error flag to read back. The test holds the stream with a host function, times the
// host side of convert + flex_attention while it is held, then checks the result against a float64 softmax
// written here. A control whose score_mod reads a captured index from another tensor (unprovable) must wait,
// which shows the timing can tell the two apart.
#include <gtest/gtest.h>

#if FLEXGRAD_TEST_CUDA_RUNTIME
#include <cuda_runtime.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#include "flexgrad/tensor/random.h"

namespace fg {
namespace {

using Clock = std::chrono::steady_clock;
const Device kGpu(DeviceType::CUDA, 0);

// Holds the stream until released or `max_s` seconds passed (so a synchronising call cannot deadlock).
struct Hold {
  std::atomic<bool> release{false};
  double max_s = 0;
};
void CUDART_CB hold_stream(void* arg) {
  auto* h = static_cast<Hold*>(arg);
  const auto t0 = Clock::now();
  while (!h->release.load() && std::chrono::duration<double>(Clock::now() - t0).count() < h->max_s)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
}

// Seconds the host spends in f() while the stream is held for `hold_s`; the stream is released afterwards.
template <class F> double host_seconds_while_held(double hold_s, F f) {
  Hold h;
  h.max_s = hold_s;
  auto s = static_cast<cudaStream_t>(cuda::current_stream(0));
  EXPECT_EQ(cudaLaunchHostFunc(s, hold_stream, &h), cudaSuccess);
  const auto t0 = Clock::now();
  f();
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  h.release = true;
  EXPECT_EQ(cudaStreamSynchronize(s), cudaSuccess);
  return dt;
}

TEST(PagedDecodeCuda, ConvertAndProvenCallsDoNotWaitForTheGpu) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  const int64_t R = 2, H = 2, S = 128, E = 64, ps = 32;
  manual_seed(11);
  Tensor k = randn({R, H, S, E}).to(kBFloat16), v = randn({R, H, S, E}).to(kBFloat16);
  Tensor q = randn({R, H, 1, E}).to(kBFloat16);
  Tensor slope = from_vector(std::vector<double>{-0.05, 0.02}, {H}, kFloat32);
  const std::vector<int64_t> lens{128, 70};

  PagedAttention pa(8, ps, R, kGpu);
  for (int64_t L : {32, 64, 96, 128})  // interleaved: each row's pages are not contiguous
    for (int64_t r = R - 1; r >= 0; --r) pa.reserve(r, L);
  const TensorOptions on_gpu = TensorOptions(kBFloat16).device(kGpu);
  Tensor kc = zeros({1, H, pa.max_cached_seq_len(), E}, on_gpu), vc = zeros_like(kc);
  pa.assign(arange(0, R, 1, kInt64), arange(0, S, 1, kInt64).unsqueeze(0).expand({R, S}), k.to(kGpu), v.to(kGpu), kc,
            vc);
  BlockMask logical = create_block_mask(noop_mask, 1, 1, 1, S, BlockSize(1, ps), kGpu);
  Tensor host_slots = arange(0, R, 1, kInt64), host_len = from_vector(lens, {R}, kInt64);
  Tensor slope_d = slope.to(kGpu), q_d = q.to(kGpu);
  FlexAttentionOptions po;
  po.score_mod = pa.get_score_mod([slope_d](Expr s, Expr, Expr h, Expr, Expr kv) {
    return s + Expr(Captured(slope_d, "slope")[h]) * kv;
  });
  auto step = [&] {
    po.block_mask = pa.convert_logical_block_mask(logical, host_slots, host_len);
    return flex_attention(q_d, kc, vc, po).out;
  };
  step();  // compiles the kernels (not part of what is timed)
  Tensor out;
  const double dt = host_seconds_while_held(1.5, [&] { out = step(); });
  EXPECT_LT(dt, 0.75) << "convert + flex_attention waited for the held stream";

  // float64 golden: softmax(q k^T / sqrt(E) + slope[h] * kv) v over kv < len of each row.
  Tensor got = out.to(kCPU).to(kFloat64);
  Tensor q64 = q.to(kFloat64), k64 = k.to(kFloat64), v64 = v.to(kFloat64);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t L = lens[static_cast<size_t>(r)];
      std::vector<double> s(static_cast<size_t>(L));
      double m = -INFINITY, z = 0;
      for (int64_t j = 0; j < L; ++j) {
        double d = 0;
        for (int64_t e = 0; e < E; ++e) d += q64.at({r, h, 0, e}) * k64.at({r, h, j, e});
        s[static_cast<size_t>(j)] = d / std::sqrt(static_cast<double>(E)) + slope.at({h}) * static_cast<double>(j);
        m = std::max(m, s[static_cast<size_t>(j)]);
      }
      for (double& x : s) z += (x = std::exp(x - m));
      for (int64_t e = 0; e < E; ++e) {
        double o = 0;
        for (int64_t j = 0; j < L; ++j) o += s[static_cast<size_t>(j)] / z * v64.at({r, h, j, e});
        EXPECT_NEAR(got.at({r, h, 0, e}), o, 2e-2) << "row " << r << " head " << h << " dim " << e;
      }
    }

  // Control: an index read from another captured tensor cannot be proven in range, so the call checks the
  // error flag after the kernel and must wait for the held stream.
  Tensor which = from_vector(std::vector<int64_t>{1, 0}, {H}, kInt64).to(kGpu);
  FlexAttentionOptions co = po;
  co.block_mask = pa.convert_logical_block_mask(logical, host_slots, host_len);
  co.score_mod = [slope_d, which](Expr s, Expr, Expr h, Expr, Expr) {
    return s + Expr(Captured(slope_d, "slope")[Expr(Captured(which, "which")[h])]);
  };
  flex_attention(q_d, kc, vc, co);  // compile
  const double waited = host_seconds_while_held(1.5, [&] { flex_attention(q_d, kc, vc, co); });
  EXPECT_GT(waited, 0.75) << "the control did not wait: the timing cannot tell a synchronising call";
}

}  // namespace
}  // namespace fg

#else
TEST(PagedDecodeCuda, ConvertAndProvenCallsDoNotWaitForTheGpu) {
  GTEST_SKIP() << "built without the CUDA runtime: nothing to test";
}
#endif
