// CPU matrix products. f32/f64 go to OpenBLAS; a matrix whose rows or columns are unit-stride is passed
// in place (as NoTrans or Trans with its leading dimension), anything else (expanded, step-sliced) is
// first copied to a contiguous buffer. f16/bf16 round-trip through f32 buffers (f32 accumulation);
// integers use a plain loop. Many small matrices run in parallel over the batch with a simple kernel
// instead, since one BLAS call per tiny matrix is dominated by call overhead.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <optional>
#include <type_traits>
#include <vector>

#include "flexgrad/ops/cpu/blas_threads.h"
#include "flexgrad/ops/linalg_kernels.h"

namespace fg {
namespace {

struct BlasOperand {
  CBLAS_TRANSPOSE trans;
  int64_t ld;
};

// How BLAS can read a rows x cols matrix with these strides without a copy, if it can.
std::optional<BlasOperand> blas_view(int64_t rows, int64_t cols, int64_t rs, int64_t cs) {
  if ((cs == 1 || cols == 1) && (rows == 1 || rs >= std::max<int64_t>(1, cols)))
    return BlasOperand{CblasNoTrans, rows == 1 ? std::max<int64_t>(1, cols) : rs};
  if ((rs == 1 || rows == 1) && (cols == 1 || cs >= std::max<int64_t>(1, rows)))
    return BlasOperand{CblasTrans, cols == 1 ? std::max<int64_t>(1, rows) : cs};
  return std::nullopt;
}

// Copies a strided rows x cols matrix into a contiguous row-major buffer of type U.
template <class T, class U>
void pack(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, U* dst) {
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) dst[i * cols + j] = static_cast<U>(static_cast<compute_t<T>>(src[i * rs + j * cs]));
}

template <class T>
void blas_gemm_serial(int64_t m, int64_t n, int64_t k, const T* a, BlasOperand oa, const T* b, BlasOperand ob, T* c) {
  if constexpr (std::is_same_v<T, float>) {
    cblas_sgemm(CblasRowMajor, oa.trans, ob.trans, m, n, k, 1.0f, a, oa.ld, b, ob.ld, 0.0f, c, std::max<int64_t>(1, n));
  } else {
    cblas_dgemm(CblasRowMajor, oa.trans, ob.trans, m, n, k, 1.0, a, oa.ld, b, ob.ld, 0.0, c, std::max<int64_t>(1, n));
  }
}

template <class T>
void blas_gemm(int64_t m, int64_t n, int64_t k, const T* a, BlasOperand oa, const T* b, BlasOperand ob, T* c) {
  cpu::use_single_threaded_blas();
  const int threads = omp_in_parallel() ? 1 : omp_get_max_threads();
  const int64_t blocks = std::min<int64_t>(threads, m / 16);
  if (blocks <= 1 || m * n * k < 64 * 64 * 64) return blas_gemm_serial<T>(m, n, k, a, oa, b, ob, c);
  // Row i of op(A) starts at a + i * ld (NoTrans) or a + i (Trans: A is stored k x m).
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(blocks))
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t i0 = m * bi / blocks, i1 = m * (bi + 1) / blocks;
    const T* ab = a + (oa.trans == CblasNoTrans ? i0 * oa.ld : i0);
    blas_gemm_serial<T>(i1 - i0, n, k, ab, oa, b, ob, c + i0 * std::max<int64_t>(1, n));
  }
}

// One f32/f64 product through BLAS, copying an operand only when BLAS cannot read it in place.
template <class T>
void gemm_one_blas(const GemmArgs& g, const T* a, const T* b, T* c, std::vector<T>& abuf, std::vector<T>& bbuf) {
  auto va = blas_view(g.m, g.k, g.a_rs, g.a_cs);
  auto vb = blas_view(g.k, g.n, g.b_rs, g.b_cs);
  if (!va) {
    abuf.resize(g.m * g.k);
    pack(a, g.m, g.k, g.a_rs, g.a_cs, abuf.data());
    a = abuf.data();
    va = BlasOperand{CblasNoTrans, std::max<int64_t>(1, g.k)};
  }
  if (!vb) {
    bbuf.resize(g.k * g.n);
    pack(b, g.k, g.n, g.b_rs, g.b_cs, bbuf.data());
    b = bbuf.data();
    vb = BlasOperand{CblasNoTrans, std::max<int64_t>(1, g.n)};
  }
  blas_gemm<T>(g.m, g.n, g.k, a, *va, b, *vb, c);
}

// The plain i-k-j loop (row of C updated by a row of B: unit-stride inner loop when B is row-major).
template <class T, class Acc>
void gemm_one_loop(const GemmArgs& g, const T* a, const T* b, T* c) {
  std::vector<Acc> row(g.n);
  for (int64_t i = 0; i < g.m; ++i) {
    std::fill(row.begin(), row.end(), Acc(0));
    for (int64_t p = 0; p < g.k; ++p) {
      const Acc av = static_cast<Acc>(static_cast<compute_t<T>>(a[i * g.a_rs + p * g.a_cs]));
      const T* brow = b + p * g.b_rs;
      for (int64_t j = 0; j < g.n; ++j) row[j] += av * static_cast<Acc>(static_cast<compute_t<T>>(brow[j * g.b_cs]));
    }
    for (int64_t j = 0; j < g.n; ++j) {
      if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) c[i * g.n + j] = T(static_cast<float>(row[j]));
      else c[i * g.n + j] = static_cast<T>(row[j]);
    }
  }
}

template <class T>
void gemm_typed(const GemmArgs& g) {
  const T* A = static_cast<const T*>(g.a);
  const T* B = static_cast<const T*>(g.b);
  T* C = static_cast<T*>(g.c);
  constexpr bool kBlas = std::is_same_v<T, float> || std::is_same_v<T, double>;
  constexpr bool kLowp = std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>;
  using Acc = std::conditional_t<kBlas || kLowp, std::conditional_t<std::is_same_v<T, double>, double, float>, int64_t>;
  const int64_t flops_per = g.m * g.n * g.k;
  const bool small = flops_per <= 48 * 48 * 48;
  if ((small || !(kBlas || kLowp)) && g.batch > 1) {
    // Many independent small products: parallel over the batch, each with the plain loop.
#pragma omp parallel for schedule(static) if (g.batch * flops_per > 65536)
    for (int64_t bi = 0; bi < g.batch; ++bi) {
      int64_t oa, ob, oc;
      g.batch_offsets(bi, oa, ob, oc);
      gemm_one_loop<T, Acc>(g, A + oa, B + ob, C + oc);
    }
    return;
  }
  std::vector<T> abuf, bbuf;
  std::vector<float> fa, fb, fc;
  for (int64_t bi = 0; bi < g.batch; ++bi) {
    int64_t oa, ob, oc;
    g.batch_offsets(bi, oa, ob, oc);
    if constexpr (kBlas) {
      gemm_one_blas<T>(g, A + oa, B + ob, C + oc, abuf, bbuf);
    } else if constexpr (kLowp) {
      // Widen to f32, multiply with sgemm (f32 accumulation), round the result once.
      fa.resize(g.m * g.k); fb.resize(g.k * g.n); fc.resize(g.m * g.n);
      pack(A + oa, g.m, g.k, g.a_rs, g.a_cs, fa.data());
      pack(B + ob, g.k, g.n, g.b_rs, g.b_cs, fb.data());
      blas_gemm<float>(g.m, g.n, g.k, fa.data(), {CblasNoTrans, std::max<int64_t>(1, g.k)}, fb.data(),
                       {CblasNoTrans, std::max<int64_t>(1, g.n)}, fc.data());
      for (int64_t i = 0; i < g.m * g.n; ++i) C[oc + i] = T(fc[i]);
    } else {
      gemm_one_loop<T, Acc>(g, A + oa, B + ob, C + oc);
    }
  }
}

void gemm_cpu(const GemmArgs& g) {
  if (g.m == 0 || g.n == 0 || g.batch == 0) return;
  FG_DISPATCH_NUMERIC_TYPES(g.dtype, "matmul", [&]<class T>() { gemm_typed<T>(g); });
}

}  // namespace

FG_REGISTER_KERNEL(gemm_stub, CPU, gemm_cpu);

}  // namespace fg
