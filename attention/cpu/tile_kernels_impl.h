// The tile kernels (tile_kernels.h) written once over a vector type, for the per-ISA translation units.
// Each TU defines an ISA description and instantiates make_table<Isa>():
//   struct Isa { static constexpr int W;           // floats per vector
//                using V, VI;                      // GCC vectors of W floats / int32
//                static V fma(V a, V b, V c);      // a * b + c (fused where the ISA has FMA)
//                static float fma1(float, float, float);  // the same for one element
//                static constexpr int MR, NV; };   // GEMM register block: MR rows x NV vectors
// Included only by tile_kernels_<isa>.cpp: the code takes the instruction set those files are compiled for.
#pragma once
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#include "flexgrad/attention/cpu/tile_kernels.h"

namespace fg::cpu::tile_impl {
// Internal linkage: every ISA's translation unit gets its own copies, compiled for its instruction set. As
// ordinary inline functions and templates (transpose32<8> is the same symbol in the AVX2 and AVX-512 files)
// the linker would keep one copy for all of them, and an AVX2 CPU could run AVX-512 code.
namespace {

template <class V> inline V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V> inline void store(float* p, V v) { std::memcpy(p, &v, sizeof v); }
// x in every lane. x - 0 (not 0 + x, which turns -0 into +0) folds away: a plain broadcast.
template <class V> inline V splat(float x) { return x - V{}; }

// One MR x (NV * W) block of C from A's rows i..i+MR and B's columns j..j+NV*W, accumulated in registers
// over the whole k loop.
template <class I, int MR, int NV, bool AT>
inline void micro(int64_t k, float alpha, const float* __restrict a, int64_t lda, const float* __restrict b,
                  int64_t ldb, bool accumulate, float* __restrict c, int64_t ldc) {
  using V = typename I::V;
  constexpr int W = I::W;
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int64_t p = 0; p < k; ++p) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = load<V>(b + p * ldb + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const V av = splat<V>(AT ? a[p * lda + r] : a[r * lda + p]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] = I::fma(av, bv[v], acc[r][v]);
    }
  }
  const V va = splat<V>(alpha);
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) {
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      float* dst = c + r * ldc + v * W;
      V out = acc[r][v] * va;
      if (accumulate) out += load<V>(dst);
      store<V>(dst, out);
    }
  }
}

// Rows i0..m of a column block of NV vectors: full MR blocks, then one block of the remaining rows.
template <class I, int NV, bool AT>
inline void column_block(int64_t m, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                         bool accumulate, float* c, int64_t ldc) {
  constexpr int MR = I::MR;
  auto a_at = [&](int64_t i) { return AT ? a + i : a + i * lda; };
  int64_t i = 0;
  for (; i + MR <= m; i += MR) micro<I, MR, NV, AT>(k, alpha, a_at(i), lda, b, ldb, accumulate, c + i * ldc, ldc);
  const int64_t rest = m - i;
  if (rest == 0) return;
  [&]<int... R>(std::integer_sequence<int, R...>) {
    // rest in [1, MR): the block of exactly `rest` rows
    ((rest == R + 1 ? micro<I, R + 1, NV, AT>(k, alpha, a_at(i), lda, b, ldb, accumulate, c + i * ldc, ldc) : void()),
     ...);
  }(std::make_integer_sequence<int, MR - 1>{});
}

template <class I>
void gemm(bool a_trans, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
          int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  constexpr int W = I::W, NV = I::NV;
  int64_t j = 0;
  auto blocks = [&]<int nv>() {
    for (; j + nv * W <= n; j += nv * W) {
      if (a_trans) column_block<I, nv, true>(m, k, alpha, a, lda, b + j, ldb, accumulate, c + j, ldc);
      else column_block<I, nv, false>(m, k, alpha, a, lda, b + j, ldb, accumulate, c + j, ldc);
    }
  };
  blocks.template operator()<NV>();
  if constexpr (NV > 2) blocks.template operator()<2>();
  if constexpr (NV > 1) blocks.template operator()<1>();
  // The last n % W columns, one element at a time (same order of products as the vector blocks).
  for (; j < n; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float s = 0;
      for (int64_t p = 0; p < k; ++p) s = I::fma1(a_trans ? a[p * lda + i] : a[i * lda + p], b[p * ldb + j], s);
      float& dst = c[i * ldc + j];
      dst = accumulate ? dst + s * alpha : s * alpha;
    }
  }
}

// Lane reductions by halving: log2 W dependent steps, not W (every row pass ends waiting on one; at a
// 128-float row the serial max was as long as the pass).
template <class I, class Op>
inline float reduce_lanes(typename I::V v, Op op) {
  using VI = typename I::VI;
  constexpr int W = I::W;
  [&]<int... H>(std::integer_sequence<int, H...>) {
    // step h combines lane j + W / 2^(h+1) into lane j
    ((v = op(v, __builtin_shuffle(v, [] {
        VI idx{};
        for (int j = 0; j < W; ++j) idx[j] = (j + (W >> (H + 1))) % W;
        return idx;
      }()))),
     ...);
  }(std::make_integer_sequence<int, std::bit_width(unsigned(W)) - 1>{});
  return v[0];
}
template <class I> inline float hsum(typename I::V v) {
  return reduce_lanes<I>(v, [](auto a, auto b) { return a + b; });
}
template <class I> inline float hmax(typename I::V v) {
  return reduce_lanes<I>(v, [](auto a, auto b) { return a > b ? a : b; });
}

template <class I>
float row_max(const float* x, int64_t n) {
  using V = typename I::V;
  constexpr int W = I::W;
  const float ninf = -std::numeric_limits<float>::infinity();
  V mv = splat<V>(ninf);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V v = load<V>(x + j);
    mv = v > mv ? v : mv;  // false for NaN: skipped
  }
  float m = hmax<I>(mv);  // mv holds no NaN
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// e^r for r = x - n ln 2 (n an integer-valued vector): vec::expf's two-step reduction and polynomial, shared by
// vexp and vexp_nonpos.
template <class I>
inline typename I::V exp_reduced(typename I::V x, typename I::V n) {
  using V = typename I::V;
  const V r = I::fma(n, splat<V>(2.12194440e-4f), I::fma(n, splat<V>(-0.693359375f), x));
  V p = splat<V>(1.9875691500e-4f);
  p = I::fma(p, r, splat<V>(1.3981999507e-3f));
  p = I::fma(p, r, splat<V>(8.3334519073e-3f));
  p = I::fma(p, r, splat<V>(4.1665795894e-2f));
  p = I::fma(p, r, splat<V>(1.6666665459e-1f));
  p = I::fma(p, r, splat<V>(5.0000001201e-1f));
  return I::fma(p * r, r, r) + 1.0f;
}

// vec::expf (tensor/vec_math.h) on W lanes: the same reduction and polynomial, with the ISA's fused
// multiply-add (the baseline rounds as vec::expf does; FMA is within an ulp of it). Lanes below -87.34 give
// 0 and above 88.72 inf by the final selects; NaN stays NaN. In between n is vec::expf's (at most 127), and
// e^r * 2^n is exact either way: AVX-512 scales with vscalefps (NaN propagates through it), the others
// build 2^n's bits, with n kept in [-127, 127] (NaN -> 127) so the float -> int conversion is defined.
template <class I>
inline typename I::V vexp(typename I::V x) {
  using V = typename I::V;
  using VI = typename I::VI;
  const V lo = splat<V>(-87.33654f), hi = splat<V>(88.72283f);
  V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (|x| large: selected away)
  n = n < 127.0f ? n : splat<V>(127.0f);
  const V er = exp_reduced<I>(x, n);
  const V inf = splat<V>(std::numeric_limits<float>::infinity());
  if constexpr (requires { I::scalef(er, n); }) {
    const V y = I::scalef(er, n);
    return x < lo ? V{} : (x > hi ? inf : y);
  } else {
    n = n > -127.0f ? n : splat<V>(-127.0f);
    const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    const V y = er * (V)bits;  // a vector cast reinterprets the bits
    return x != x ? x : (x > hi ? inf : (x < lo ? V{} : y));
  }
}

// x[j] = exp(x[j] - m) in place by `vexp_fn` (vexp or vexp_nonpos below), returning the sum.
template <class I, class ExpFn>
float exp_sum_by(float* x, int64_t n, float m, ExpFn vexp_fn) {
  using V = typename I::V;
  constexpr int W = I::W;
  V sv{};
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = vexp_fn(load<V>(x + j) - m);
    store<V>(x + j, e);
    sv += e;
  }
  float s = hsum<I>(sv);
  for (; j < n; ++j) {
    x[j] = vexp_fn(splat<V>(x[j] - m))[0];
    s += x[j];
  }
  return s;
}

template <class I>
float exp_sum(float* x, int64_t n, float m) {
  return exp_sum_by<I>(x, n, m, [](typename I::V v) { return vexp<I>(v); });
}

// e^x for x <= 0 or NaN (a score minus its row's finite max): vexp's reduction and polynomial without the
// overflow side (no clamp of n at 127, no inf select) and with n = round(x log2 e) from one multiply-add, a
// third fewer operations in the softmax's exp pass. x < -87.34 (and -inf) gives 0, NaN stays NaN; AVX-512
// and AVX2 round identically here too. Also right for 0 < x < 88 (n <= 127).
template <class I>
inline typename I::V vexp_nonpos(typename I::V x) {
  using V = typename I::V;
  using VI = typename I::VI;
  const V lo = splat<V>(-87.33654f);
  V n = I::fma(x, splat<V>(1.44269504088896341f), splat<V>(12582912.0f)) - 12582912.0f;
  const V er = exp_reduced<I>(x, n);
  if constexpr (requires { I::scalef(er, n); }) {
    return x < lo ? V{} : I::scalef(er, n);  // NaN propagates through scalef
  } else {
    n = n > -127.0f ? n : splat<V>(-127.0f);  // -inf and NaN: a defined conversion (selected away below)
    const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
    const V y = er * (V)bits;
    return x != x ? x : (x < lo ? V{} : y);
  }
}

template <class I>
float exp_sum_max(float* x, int64_t n, float m) {
  return exp_sum_by<I>(x, n, m, [](typename I::V v) { return vexp_nonpos<I>(v); });
}

// out[j] = outer * tanh(x[j] / inner) (divide) or outer * tanh(x[j] * inner): the softcap score_mod in one
// pass, where the interpreter makes three (the division, tanh, the product). tanh is vec::tanhf's split:
// its odd polynomial below |y| = 0.625, else (1 - e) / (1 + e) with e = exp(-2|y|) <= 1 (vexp_nonpos, no
// overflow side: the same value as vec::tanhf's 1 - 2 / (exp(2|y|) + 1) within an ulp or two); tanh(+-inf)
// = +-1, NaN stays NaN.
template <class I>
inline typename I::V vsoftcap_tanh(typename I::V x, float inner, bool divide) {
  using V = typename I::V;
  const V y = divide ? x / inner : x * inner;
  const V ay = y < 0.0f ? -y : y;
  const V e = vexp_nonpos<I>(ay * -2.0f);
  const V big = (1.0f - e) / (1.0f + e);
  const V z = y * y;
  V p = splat<V>(-5.70498872745e-3f);
  p = I::fma(p, z, splat<V>(2.06390887954e-2f));
  p = I::fma(p, z, splat<V>(-5.37397155531e-2f));
  p = I::fma(p, z, splat<V>(1.33314422036e-1f));
  p = I::fma(p, z, splat<V>(-3.33332819422e-1f));
  const V small = I::fma(p * z, y, y);
  return ay < 0.625f ? small : (y < 0.0f ? -big : big);  // NaN: big (NaN)
}
template <class I>
inline typename I::V vsoftcap(typename I::V x, float inner, bool divide, float outer) {
  return vsoftcap_tanh<I>(x, inner, divide) * outer;
}

template <class I>
void softcap(const float* x, int64_t n, float inner, bool divide, float outer, float* out) {
  using V = typename I::V;
  constexpr int W = I::W;
  int64_t j = 0;
  for (; j + W <= n; j += W) store<V>(out + j, vsoftcap<I>(load<V>(x + j), inner, divide, outer));
  for (; j < n; ++j) out[j] = vsoftcap<I>(splat<V>(x[j]), inner, divide, outer)[0];
}

// softcap, and its derivative grad[j] = (1 - t^2) * (outer / inner or outer * inner) from the same t = tanh
// (the backward's dS factor, one tanh per score instead of two).
template <class I>
void softcap_grad(const float* x, int64_t n, float inner, bool divide, float outer, float* out, float* grad) {
  using V = typename I::V;
  constexpr int W = I::W;
  const float k = divide ? outer / inner : outer * inner;
  auto one = [&](V xv, V& o, V& g) {
    const V t = vsoftcap_tanh<I>(xv, inner, divide);
    o = t * outer;
    g = (1.0f - t * t) * k;
  };
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    V o, g;
    one(load<V>(x + j), o, g);
    store<V>(out + j, o);
    store<V>(grad + j, g);
  }
  for (; j < n; ++j) {
    V o, g;
    one(splat<V>(x[j]), o, g);
    out[j] = o[0];
    grad[j] = g[0];
  }
}

template <class I>
void softmax_grad(float* dp, const float* p, int64_t n, float delta) {
  using V = typename I::V;
  constexpr int W = I::W;
  int64_t j = 0;
  for (; j + W <= n; j += W) store<V>(dp + j, load<V>(p + j) * (load<V>(dp + j) - delta));
  for (; j < n; ++j) dp[j] = p[j] * (dp[j] - delta);
}

// dst[c * ldd + r] = src[r * cols + c] for 32-bit elements (floats, bf16 pairs): 8 x 8
// blocks by three rounds of two-vector shuffles (4 x 4 blocks and two rounds in the SSE2 baseline), the
// edges one element at a time.
typedef uint32_t U32x8 __attribute__((vector_size(32)));
typedef int32_t I32x8 __attribute__((vector_size(32)));
typedef uint32_t U32x4 __attribute__((vector_size(16)));
typedef int32_t I32x4 __attribute__((vector_size(16)));

template <int B>
void transpose32(const void* src_v, int64_t rows, int64_t cols, void* dst_v, int64_t ldd) {
  using U = std::conditional_t<B == 8, U32x8, U32x4>;  // (a vector_size that depends on B is not a vector)
  using M = std::conditional_t<B == 8, I32x8, I32x4>;
  const uint32_t* src = static_cast<const uint32_t*>(src_v);
  uint32_t* dst = static_cast<uint32_t*>(dst_v);
  int64_t r0 = 0;
  for (; r0 + B <= rows; r0 += B) {
    int64_t c0 = 0;
    for (; c0 + B <= cols; c0 += B) {
      U r[B];
      for (int i = 0; i < B; ++i) std::memcpy(&r[i], src + (r0 + i) * cols + c0, sizeof(U));
      U o[B];
      if constexpr (B == 8) {
        U t[8], u[8];
        for (int i = 0; i < 8; i += 2) {  // pairs of rows interleaved
          t[i] = __builtin_shuffle(r[i], r[i + 1], M{0, 8, 1, 9, 4, 12, 5, 13});
          t[i + 1] = __builtin_shuffle(r[i], r[i + 1], M{2, 10, 3, 11, 6, 14, 7, 15});
        }
        for (int i = 0; i < 8; i += 4) {  // quads: columns j and j + 4 of four rows
          u[i] = __builtin_shuffle(t[i], t[i + 2], M{0, 1, 8, 9, 4, 5, 12, 13});
          u[i + 1] = __builtin_shuffle(t[i], t[i + 2], M{2, 3, 10, 11, 6, 7, 14, 15});
          u[i + 2] = __builtin_shuffle(t[i + 1], t[i + 3], M{0, 1, 8, 9, 4, 5, 12, 13});
          u[i + 3] = __builtin_shuffle(t[i + 1], t[i + 3], M{2, 3, 10, 11, 6, 7, 14, 15});
        }
        for (int j = 0; j < 4; ++j) {  // the two halves of the rows
          o[j] = __builtin_shuffle(u[j], u[j + 4], M{0, 1, 2, 3, 8, 9, 10, 11});
          o[j + 4] = __builtin_shuffle(u[j], u[j + 4], M{4, 5, 6, 7, 12, 13, 14, 15});
        }
      } else {
        static_assert(B == 4);
        const U t0 = __builtin_shuffle(r[0], r[1], M{0, 4, 1, 5}), t1 = __builtin_shuffle(r[0], r[1], M{2, 6, 3, 7});
        const U t2 = __builtin_shuffle(r[2], r[3], M{0, 4, 1, 5}), t3 = __builtin_shuffle(r[2], r[3], M{2, 6, 3, 7});
        o[0] = __builtin_shuffle(t0, t2, M{0, 1, 4, 5});
        o[1] = __builtin_shuffle(t0, t2, M{2, 3, 6, 7});
        o[2] = __builtin_shuffle(t1, t3, M{0, 1, 4, 5});
        o[3] = __builtin_shuffle(t1, t3, M{2, 3, 6, 7});
      }
      for (int j = 0; j < B; ++j) std::memcpy(dst + (c0 + j) * ldd + r0, &o[j], sizeof(U));
    }
    for (; c0 < cols; ++c0)
      for (int64_t r = r0; r < r0 + B; ++r) dst[c0 * ldd + r] = src[r * cols + c0];
  }
  for (; r0 < rows; ++r0)
    for (int64_t c = 0; c < cols; ++c) dst[c * ldd + r0] = src[r0 * cols + c];
}

template <class I>
const TileKernels& make_table(const char* name) {
  static const TileKernels t{name, &gemm<I>, &row_max<I>, &exp_sum<I>, &exp_sum_max<I>, &softcap<I>, &softcap_grad<I>,
                            &softmax_grad<I>,
                            &transpose32<(I::W >= 8 ? 8 : 4)>, nullptr, nullptr, nullptr, nullptr};
  return t;
}

}  // namespace
}  // namespace fg::cpu::tile_impl
