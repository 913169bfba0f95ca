// Float32 tile kernels of the fused CPU FlexAttention (flex_cpu.cpp): a register-blocked GEMM for the
// 128 x 128 score tiles and the softmax row passes, one implementation per instruction set.
//
// The library is built for the baseline x86-64 (FLEXGRAD_NATIVE=OFF) or the build machine; these kernels
// are compiled three times with per-file flags (CMakeLists.txt): AVX-512 (tile_kernels_avx512.cpp), AVX2 +
// FMA (tile_kernels_avx2.cpp) and the baseline (tile_kernels_generic.cpp, SSE2, no FMA); on a CPU with
// AVX-512 BF16 the AVX-512 table also has bfloat16 products (tile_kernels_avx512bf16.cpp). tile_kernels()
// picks the best one the running CPU supports, once, with __builtin_cpu_supports, so one binary is fast on
// an AVX-512 machine and still runs on one without AVX. FLEXGRAD_CPU_ISA=avx512_bf16|avx512|avx2|generic
// forces one (a ValueError when the CPU lacks it). AVX-512 and AVX2 round identically (the same fused
// multiply-add per element in the same order); the baseline rounds each product and sum separately.
#pragma once
#include <cstdint>

namespace fg::cpu {

enum class TileIsa { Generic, Avx2, Avx512, Avx512Bf16 };

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
  // The same for a softmax row whose maximum m is finite (every x[j] <= m, or NaN), a third cheaper: within
  // an ulp of exp, not rounded as vec::expf (n from a fused multiply-add); -inf -> 0, NaN stays NaN.
  float (*exp_sum_max)(float* x, int64_t n, float m);
  // out[j] = outer * tanh(x[j] / inner) (divide), or outer * tanh(x[j] * inner): the softcap score_mod in
  // one pass (out may be x). tanh within 1.5 ulp of float64's; +-inf -> +-1, NaN stays NaN.
  void (*softcap)(const float* x, int64_t n, float inner, bool divide, float outer, float* out);
  // softcap's value (out) and its derivative d out / d x (grad) from one tanh per element: grad[j] =
  // (1 - t^2) * k with t = tanh(x[j] / inner) (or * inner) and k = outer / inner (or outer * inner), rounded
  // in that order; 0 at +-inf, NaN stays NaN. out or grad may be x.
  void (*softcap_grad)(const float* x, int64_t n, float inner, bool divide, float outer, float* out, float* grad);
  // dp[j] = p[j] * (dp[j] - delta): the softmax backward of one row.
  void (*softmax_grad)(float* dp, const float* p, int64_t n, float delta);
  // dst[c * ldd + r] = src[r * cols + c] for r < rows, c < cols: the transpose of a row-major block of
  // 32-bit elements (floats, bf16 pairs) into columns of a matrix with leading dimension ldd.
  void (*transpose32)(const void* src, int64_t rows, int64_t cols, void* dst, int64_t ldd);
  // bfloat16 products with float32 sums (null without AVX-512 BF16). Operands are bf16 pairs in uint32
  // (the lower address, element 2p, in the low half): A is m x k2 pairs (lda in pairs; A(i, p) holds
  // elements 2p and 2p + 1 of row i, at a[i * lda + p], or with a_trans at a[p * lda + i]), B is k2 x n
  // pairs (ldb in pairs; B[p][j] holds rows 2p and 2p + 1 of column j). C (m x n float, ldc) = alpha A B
  // (+ C when accumulate).
  void (*gemm_bf16)(bool a_trans, int64_t m, int64_t n, int64_t k2, float alpha, const uint32_t* a, int64_t lda,
                    const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);
  // dst = the bf16 pairs of x[0..n), rounded to nearest even (an odd n leaves the last high half 0).
  void (*to_bf16_pairs)(const float* x, int64_t n, uint32_t* dst);
  // Pairs of rows (the B layout): dst[p * ld + j] = (x[2p][j], x[2p + 1][j]) for x rows x cols (leading
  // dimension ldx), float rounded to bf16 or bf16 bits as they are; an odd row count pads with 0.
  void (*pair_rows_f32)(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld);
  void (*pair_rows_bf16)(const uint16_t* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld);
};

// The kernels of the running CPU (or FLEXGRAD_CPU_ISA), chosen on the first call.
const TileKernels& tile_kernels();
// The kernels of one instruction set: ValueError when this CPU cannot run them.
const TileKernels& tile_kernels(TileIsa isa);
bool cpu_supports(TileIsa isa);

// Per-ISA tables (tile_kernels_<isa>.cpp); only call one whose ISA cpu_supports.
const TileKernels& tile_kernels_avx512();
const TileKernels& tile_kernels_avx512_bf16();
const TileKernels& tile_kernels_avx2();
const TileKernels& tile_kernels_generic();

}  // namespace fg::cpu
