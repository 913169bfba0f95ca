// Float32 tile kernels of the fused CPU FlexAttention (flex_cpu.cpp): a register-blocked GEMM for the
// 128 x 128 score tiles and the softmax row passes, one implementation per instruction set.
//
// The library is built for the baseline x86-64 (FLEXGRAD_NATIVE=OFF) or the build machine; these kernels
// are compiled three times with per-file flags (CMakeLists.txt): AVX-512 (tile_kernels_avx512.cpp), AVX2 +
// FMA (tile_kernels_avx2.cpp) and the baseline (tile_kernels_generic.cpp, SSE2, no FMA). tile_kernels()
// picks the best one the running CPU supports, once, with __builtin_cpu_supports, so one binary is fast on
// an AVX-512 machine and still runs on one without AVX. FLEXGRAD_CPU_ISA=avx512|avx2|generic forces one
// (a ValueError when the CPU lacks it). AVX-512 and AVX2 round identically (the same fused multiply-add
// per element in the same order); the baseline rounds each product and sum separately.
#pragma once
#include <cstdint>

namespace fg::cpu {

enum class TileIsa { Generic, Avx2, Avx512 };

struct TileKernels {
  const char* name;  // "avx512", "avx2", "generic"
  // C (m x n, row-major, ldc) = alpha * op(A) B (+ C when accumulate). op(A) is m x k: A row-major with
  // leading dimension lda, or, with a_trans, A stored k x m (element (i, p) at a[p * lda + i]); B is k x n
  // row-major (ldb). Each element sums its k products in order (p = 0, 1, ...).
  void (*gemm)(bool a_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
               const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);
  // The largest of x[0..n), skipping NaN; -inf when n = 0 or every element is NaN or -inf.
  float (*row_max)(const float* x, int64_t n);
  // x[j] = exp(x[j] - m) in place (vec::expf's semantics), returns the sum of the new x.
  float (*exp_sum)(float* x, int64_t n, float m);
  // dp[j] = p[j] * (dp[j] - delta): the softmax backward of one row.
  void (*softmax_grad)(float* dp, const float* p, int64_t n, float delta);
};

// The kernels of the running CPU (or FLEXGRAD_CPU_ISA), chosen on the first call.
const TileKernels& tile_kernels();
// The kernels of one instruction set: ValueError when this CPU cannot run them.
const TileKernels& tile_kernels(TileIsa isa);
bool cpu_supports(TileIsa isa);

// Per-ISA tables (tile_kernels_<isa>.cpp); only call one whose ISA cpu_supports.
const TileKernels& tile_kernels_avx512();
const TileKernels& tile_kernels_avx2();
const TileKernels& tile_kernels_generic();

}  // namespace fg::cpu
