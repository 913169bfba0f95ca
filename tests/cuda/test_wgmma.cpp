// The Hopper wgmma helpers (attention/cuda/kernels/flex_wgmma.cuh) against float64 products written here: one
// warpgroup multiplies 64 x 64 bf16 tiles in 128-byte-swizzled shared memory the three ways a FlexAttention
// main loop needs them: S = Q K^T (both K-major), O = P V with V MN-major, and O = P V with P from registers
// (mma.sync's A fragment), plus A^T V with A read MN-major (the fused dQ = dS K of the backward, from a stored
// dS^T); and the m64n128 form over a two-atom k that the FlexAttention forward adds. Runs where
// NVRTC targets sm_90a; skips visibly elsewhere.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/jit.h"
#endif
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"

namespace fg {
namespace {

#ifdef FLEXGRAD_WITH_CUDA

const char* kKernel = R"(
#include "flex_abi.cuh"
#include "flex_mma.cuh"
#include "flex_wgmma.cuh"

// out[64 x 64] from the accumulators of warpgroup (see flex_wgmma.cuh for the layout).
__device__ void store_acc(const float* d, float* out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = 16 * warp + g, c = 8 * j + 2 * t;
    out[r * 64 + c] = d[4 * j];
    out[r * 64 + c + 1] = d[4 * j + 1];
    out[(r + 8) * 64 + c] = d[4 * j + 2];
    out[(r + 8) * 64 + c + 1] = d[4 * j + 3];
  }
}

// A [64 m][64 k], Bk [64 n][64 k], V [64 k][64 n], bf16 bits, row-major. out: 4 x [64][64] f32:
// A Bk^T, A V (V from shared memory, MN-major), A V with A's fragments in registers, A^T V (sA read as a
// transposed A operand: its rows are k).
extern "C" __global__ void __launch_bounds__(128) fg_test_wgmma(const unsigned short* A, const unsigned short* Bk,
                                                                 const unsigned short* V, float* out) {
  __shared__ __align__(1024) unsigned short sA[64 * 64];
  __shared__ __align__(1024) unsigned short sB[64 * 64];
  __shared__ __align__(1024) unsigned short sV[64 * 64];
  for (int i = threadIdx.x; i < 64 * 64; i += 128) {
    const int r = i / 64, c = i % 64, o = fg_swizzle_b16(r, c, 64);
    sA[o] = A[i];
    sB[o] = Bk[i];
    sV[o] = V[i];
  }
  fg_fence_proxy_async();
  __syncthreads();
  const unsigned a0 = fg_smem_addr(sA), b0 = fg_smem_addr(sB), v0 = fg_smem_addr(sV);
  float d[32];

  // 1. S = A Bk^T: both K-major, the k16 step j 32 bytes into the rows.
#pragma unroll
  for (int i = 0; i < 32; ++i) d[i] = 0.f;
  fg_wgmma_fence();
  fg_wgmma_fence_operands<32>(d);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    fg_wgmma_m64n64k16_ss<0, 1>(d, fg_gmma_desc_sw128(a0 + 32 * j, 16, 1024), fg_gmma_desc_sw128(b0 + 32 * j, 16, 1024),
                                j > 0);
  fg_wgmma_commit();
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<32>(d);
  store_acc(d, out);

  // 2. O = A V: V MN-major (transposed B), the k16 step j at row 16 j.
  fg_wgmma_fence();
  fg_wgmma_fence_operands<32>(d);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    fg_wgmma_m64n64k16_ss<1, 1>(d, fg_gmma_desc_sw128(a0 + 32 * j, 16, 1024),
                                fg_gmma_desc_sw128(v0 + 2048 * j, 1024, 1024), j > 0);
  fg_wgmma_commit();
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<32>(d);
  store_acc(d, out + 64 * 64);

  // 3. The same with A's fragments in registers (as P after the softmax), read from global memory.
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  unsigned af[4][4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const unsigned* row0 = (const unsigned*)(A + (16 * warp + g) * 64 + 16 * j);
    const unsigned* row8 = (const unsigned*)(A + (16 * warp + g + 8) * 64 + 16 * j);
    af[j][0] = row0[t];
    af[j][1] = row8[t];
    af[j][2] = row0[t + 4];
    af[j][3] = row8[t + 4];
  }
  fg_wgmma_fence();
  fg_wgmma_fence_operands<32>(d);
#pragma unroll
  for (int j = 0; j < 4; ++j) fg_wgmma_m64n64k16_rs<1, 1>(d, af[j], fg_gmma_desc_sw128(v0 + 2048 * j, 1024, 1024), j > 0);
  fg_wgmma_commit();
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<32>(d);
  store_acc(d, out + 2 * 64 * 64);

  // 4. A^T V: the stored A tile as an MN-major A operand (rows = k, 64 m a row; the k16 step j at row 16 j).
  fg_wgmma_fence();
  fg_wgmma_fence_operands<32>(d);
#pragma unroll
  for (int j = 0; j < 4; ++j)
    fg_wgmma_m64n64k16_ss<1, 1, 1>(d, fg_gmma_desc_sw128(a0 + 2048 * j, 1024, 1024),
                                   fg_gmma_desc_sw128(v0 + 2048 * j, 1024, 1024), j > 0);
  fg_wgmma_commit();
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<32>(d);
  store_acc(d, out + 3 * 64 * 64);
}
)";

TEST(Wgmma, SwizzledTilesMultiplyAsFloat64Products) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  if (cuda::jit::target_arch(0) != "sm_90a") GTEST_SKIP() << "wgmma needs sm_90a; this device is " << cuda::jit::target_arch(0);
  manual_seed(5);
  Tensor A = randn({64, 64}).to(kBFloat16), Bk = randn({64, 64}).to(kBFloat16), V = randn({64, 64}).to(kBFloat16);
  const Device gpu(DeviceType::CUDA, 0);
  Tensor Ad = A.to(gpu), Bd = Bk.to(gpu), Vd = V.to(gpu);
  Tensor out = zeros({4, 64, 64}, TensorOptions().device(gpu));
  cuda::jit::JitSource src;
  src.name = "test_wgmma";
  src.code = kKernel;
  src.kernels = {"fg_test_wgmma"};
  auto mod = cuda::jit::get_module(src, 0);
  const void* pa = Ad.data_ptr();
  const void* pb = Bd.data_ptr();
  const void* pv = Vd.data_ptr();
  void* po = out.data_ptr();
  void* args[] = {&pa, &pb, &pv, &po};
  cuda::jit::launch(mod->function("fg_test_wgmma"), {1}, {128}, 0, args, 0);
  Tensor got = out.to(kCPU).to(kFloat64);
  Tensor a = A.to(kFloat64), b = Bk.to(kFloat64), v = V.to(kFloat64);
  const char* names[] = {"A Bk^T (both K-major)", "A V (V MN-major)", "A V (A in registers)", "A^T V (A MN-major)"};
  for (int which = 0; which < 4; ++which) {
    double worst = 0;
    for (int64_t m = 0; m < 64; ++m)
      for (int64_t n = 0; n < 64; ++n) {
        double ref = 0;
        for (int64_t k = 0; k < 64; ++k)
          ref += (which == 3 ? a.at({k, m}) : a.at({m, k})) * (which == 0 ? b.at({n, k}) : v.at({k, n}));
        worst = std::max(worst, std::abs(got.at({which, m, n}) - ref));
      }
    // bf16 inputs are exact in the products; fp32 accumulation of 64 terms of size ~1 errs by ~1e-5.
    EXPECT_LT(worst, 1e-3) << names[which] << ": worst |error| " << worst;
  }
}

// The forms flex_fwd_wgmma adds: m64n128k16 with both operands K-major, f16, over a k of 128 stored as two
// 64-column atoms (fg_sw128_atoms_offset, the forward's Q / K layout): k16 step kk at atom kk / 4, 32 * (kk % 4)
// bytes into the rows. A [64 m][128 k], B [128 n][128 k], f16 bits; out [64][128] f32 = A B^T.
const char* kKernelN128 = R"(
#include "flex_abi.cuh"
#include "flex_mma.cuh"
#include "flex_wgmma.cuh"

extern "C" __global__ void __launch_bounds__(128) fg_test_wgmma_n128(const unsigned short* A, const unsigned short* B,
                                                                      float* out) {
  __shared__ __align__(1024) unsigned short sA[64 * 128];
  __shared__ __align__(1024) unsigned short sB[128 * 128];
  for (int i = threadIdx.x; i < 64 * 128; i += 128) sA[fg_sw128_atoms_offset<64>(i / 128, i % 128)] = A[i];
  for (int i = threadIdx.x; i < 128 * 128; i += 128) sB[fg_sw128_atoms_offset<128>(i / 128, i % 128)] = B[i];
  fg_fence_proxy_async();
  __syncthreads();
  const unsigned a0 = fg_smem_addr(sA), b0 = fg_smem_addr(sB);
  float d[64];
  fg_wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    const unsigned atom = kk >> 2, j = kk & 3;
    fg_wgmma_ss<128, 0, 0>(d, fg_gmma_desc_sw128(a0 + atom * (64 * 128) + 32 * j, 16, 1024),
                           fg_gmma_desc_sw128(b0 + atom * (128 * 128) + 32 * j, 16, 1024), kk > 0);
  }
  fg_wgmma_commit();
  fg_wgmma_wait<0>();
  fg_wgmma_fence_operands<64>(d);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int r = 16 * warp + g, c = 8 * j + 2 * t;
    out[r * 128 + c] = d[4 * j];
    out[r * 128 + c + 1] = d[4 * j + 1];
    out[(r + 8) * 128 + c] = d[4 * j + 2];
    out[(r + 8) * 128 + c + 1] = d[4 * j + 3];
  }
}
)";

TEST(Wgmma, N128KMajorProductOverTwoAtomsInFloat16) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present";
  if (cuda::jit::target_arch(0) != "sm_90a") GTEST_SKIP() << "wgmma needs sm_90a; this device is " << cuda::jit::target_arch(0);
  manual_seed(6);
  Tensor A = randn({64, 128}).to(kFloat16), B = randn({128, 128}).to(kFloat16);
  const Device gpu(DeviceType::CUDA, 0);
  Tensor Ad = A.to(gpu), Bd = B.to(gpu);
  Tensor out = zeros({64, 128}, TensorOptions().device(gpu));
  cuda::jit::JitSource src;
  src.name = "test_wgmma_n128";
  src.code = kKernelN128;
  src.kernels = {"fg_test_wgmma_n128"};
  auto mod = cuda::jit::get_module(src, 0);
  const void* pa = Ad.data_ptr();
  const void* pb = Bd.data_ptr();
  void* po = out.data_ptr();
  void* args[] = {&pa, &pb, &po};
  cuda::jit::launch(mod->function("fg_test_wgmma_n128"), {1}, {128}, 0, args, 0);
  Tensor got = out.to(kCPU).to(kFloat64);
  Tensor a = A.to(kFloat64), b = B.to(kFloat64);
  double worst = 0;
  for (int64_t m = 0; m < 64; ++m)
    for (int64_t n = 0; n < 128; ++n) {
      double ref = 0;
      for (int64_t k = 0; k < 128; ++k) ref += a.at({m, k}) * b.at({n, k});
      worst = std::max(worst, std::abs(got.at({m, n}) - ref));
    }
  // f16 products are exact in f32; 128 terms of size ~1 accumulate ~1e-5 of rounding.
  EXPECT_LT(worst, 1e-3) << "worst |error| " << worst;
}

#else
TEST(Wgmma, NotBuiltWithCuda) { GTEST_SKIP() << "flexgrad built without CUDA: no run-time compiler"; }
#endif

}  // namespace
}  // namespace fg
