// The bfloat16 tile products for AVX-512 BF16 (compiled with -mavx512bf16 besides the AVX-512 flags, see
// CMakeLists.txt): vdpbf16ps multiplies 16 pairs of bf16 and adds both products to 16 float32 sums, twice
// the multiply-adds per instruction of the float32 kernel. tile_kernels() attaches these to the AVX-512
// table only on a CPU that has AVX-512 BF16.
// GCC 12's AVX-512 intrinsics pass _mm512_undefined_*() as the pass-through operand of their masked
// builtins and then warn that it may be used uninitialized (a false positive: the mask is all ones).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <cstring>
#include <utility>

#include "flexgrad/attention/cpu/tile_kernels.h"

namespace fg::cpu {
namespace {

constexpr int MR = 6, NV = 4, W = 16;  // as the float32 AVX-512 block: 24 accumulators

inline __m512bh as_bh(__m512i x) {
  __m512bh r;
  std::memcpy(&r, &x, sizeof r);
  return r;
}

// 16 bf16 zero-extended to 32-bit lanes.
inline __m512i widen(__m256bh x) {
  __m256i i;
  std::memcpy(&i, &x, sizeof i);
  return _mm512_cvtepu16_epi32(i);
}

inline float bf16_lo(uint32_t pair) { uint32_t b = pair << 16; float f; std::memcpy(&f, &b, 4); return f; }
inline float bf16_hi(uint32_t pair) { uint32_t b = pair & 0xffff0000u; float f; std::memcpy(&f, &b, 4); return f; }

template <int R, int V, bool AT>
inline void micro(int64_t k2, float alpha, const uint32_t* __restrict a, int64_t lda, const uint32_t* __restrict b,
                  int64_t ldb, bool accumulate, float* __restrict c, int64_t ldc) {
  __m512 acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < k2; ++p) {
    __m512bh bv[V];
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) bv[v] = as_bh(_mm512_loadu_si512(b + p * ldb + v * W));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const __m512bh av = as_bh(_mm512_set1_epi32(static_cast<int>(AT ? a[p * lda + r] : a[r * lda + p])));
#pragma GCC unroll 8
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
    }
  }
  const __m512 va = _mm512_set1_ps(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < V; ++v) {
      float* dst = c + r * ldc + v * W;
      __m512 out = _mm512_mul_ps(acc[r][v], va);
      if (accumulate) out = _mm512_add_ps(out, _mm512_loadu_ps(dst));
      _mm512_storeu_ps(dst, out);
    }
  }
}

template <int V, bool AT>
void column_block(int64_t m, int64_t k2, float alpha, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                  bool accumulate, float* c, int64_t ldc) {
  auto a_at = [&](int64_t i) { return AT ? a + i : a + i * lda; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) micro<MR, V, AT>(k2, alpha, a_at(i), lda, b, ldb, accumulate, c + i * ldc, ldc);
  const int64_t rest = m - i;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    ((rest == R + 1 ? micro<R + 1, V, AT>(k2, alpha, a_at(i), lda, b, ldb, accumulate, c + i * ldc, ldc) : void()),
     ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

template <bool AT>
void gemm_bf16_t(int64_t m, int64_t n, int64_t k2, float alpha, const uint32_t* a, int64_t lda, const uint32_t* b,
                 int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + NV * W <= n; j += NV * W) column_block<NV, AT>(m, k2, alpha, a, lda, b + j, ldb, accumulate, c + j, ldc);
  for (; j + 2 * W <= n; j += 2 * W) column_block<2, AT>(m, k2, alpha, a, lda, b + j, ldb, accumulate, c + j, ldc);
  for (; j + W <= n; j += W) column_block<1, AT>(m, k2, alpha, a, lda, b + j, ldb, accumulate, c + j, ldc);
  // The last n % 16 columns one element at a time: the same pairs, each pair's two products added to the sum.
  for (; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float s = 0;
      for (int64_t p = 0; p < k2; ++p) {
        const uint32_t x = AT ? a[p * lda + i] : a[i * lda + p], y = b[p * ldb + j];
        s += bf16_lo(x) * bf16_lo(y) + bf16_hi(x) * bf16_hi(y);
      }
      float& dst = c[i * ldc + j];
      dst = accumulate ? dst + s * alpha : s * alpha;
    }
  }
}

// bf16 pairs of x (round to nearest even, as torch's float -> bfloat16); an odd n leaves the last high half 0.
void to_bf16_pairs(const float* x, int64_t n, uint32_t* dst) {
  int64_t j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(x + j + W), _mm512_loadu_ps(x + j));
    std::memcpy(dst + j / 2, &v, sizeof v);
  }
  for (; j < n; j += 2) {
    const float lo = x[j], hi = j + 1 < n ? x[j + 1] : 0.0f;
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_set1_ps(hi), _mm512_set1_ps(lo));
    uint16_t h[32];
    std::memcpy(h, &v, sizeof h);
    dst[j / 2] = static_cast<uint32_t>(h[0]) | static_cast<uint32_t>(h[16]) << 16;
  }
}

void gemm_bf16(bool a_trans, int64_t m, int64_t n, int64_t k2, float alpha, const uint32_t* a, int64_t lda,
               const uint32_t* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  if (a_trans) gemm_bf16_t<true>(m, n, k2, alpha, a, lda, b, ldb, accumulate, c, ldc);
  else gemm_bf16_t<false>(m, n, k2, alpha, a, lda, b, ldb, accumulate, c, ldc);
}

// Pairs of rows: dst[p * ld + j] = (row 2p, row 2p + 1) of column j; an odd row count pads with 0.
void pair_rows_f32(const float* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const float* lo = x + 2 * p * ldx;
    const float* hi = 2 * p + 1 < rows ? lo + ldx : nullptr;
    uint32_t* out = dst + p * ld;
    int64_t j = 0;
    for (; j + W <= cols; j += W) {
      const __m512i l = widen(_mm512_cvtneps_pbh(_mm512_loadu_ps(lo + j)));
      const __m512i h = hi ? widen(_mm512_cvtneps_pbh(_mm512_loadu_ps(hi + j))) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    for (; j < cols; ++j) {
      uint32_t pr[2];
      const float lh[2] = {lo[j], hi ? hi[j] : 0.0f};
      to_bf16_pairs(lh, 2, pr);
      out[j] = pr[0];
    }
  }
}

void pair_rows_bf16(const uint16_t* x, int64_t ldx, int64_t rows, int64_t cols, uint32_t* dst, int64_t ld) {
  for (int64_t p = 0; 2 * p < rows; ++p) {
    const uint16_t* lo = x + 2 * p * ldx;
    const uint16_t* hi = 2 * p + 1 < rows ? lo + ldx : nullptr;
    uint32_t* out = dst + p * ld;
    int64_t j = 0;
    for (; j + W <= cols; j += W) {
      const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(lo + j)));
      const __m512i h = hi ? _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(hi + j)))
                           : _mm512_setzero_si512();
      _mm512_storeu_si512(out + j, _mm512_or_si512(l, _mm512_slli_epi32(h, 16)));
    }
    for (; j < cols; ++j) out[j] = static_cast<uint32_t>(lo[j]) | (hi ? static_cast<uint32_t>(hi[j]) << 16 : 0u);
  }
}

}  // namespace

const TileKernels& tile_kernels_avx512_bf16() {
  static const TileKernels t = [] {
    TileKernels k = tile_kernels_avx512();
    k.name = "avx512_bf16";
    k.gemm_bf16 = &gemm_bf16;
    k.to_bf16_pairs = &to_bf16_pairs;
    k.pair_rows_f32 = &pair_rows_f32;
    k.pair_rows_bf16 = &pair_rows_bf16;
    return k;
  }();
  return t;
}

}  // namespace fg::cpu
