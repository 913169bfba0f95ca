// CPU kernel for index_select / gather / index_add / scatter_add (ops/index_kernels.h). Positions are
// processed in blocks so that, for the common [rows, features] layout, the inner loop walks a contiguous
// run of features while j (the index) advances in order.
#include <algorithm>
#include <array>
#include <type_traits>

#include "flexgrad/ops/index_kernels.h"

namespace fg {
namespace {

constexpr int64_t kBlock = 64;

template <class T>
void dim_index_typed(const DimIndexArgs& a, bool accumulate) {
  T* out = static_cast<T*>(a.out);
  const T* src = static_cast<const T*>(a.src);
  const int64_t nblocks = (a.n_pos + kBlock - 1) / kBlock;
  const int64_t ods = a.dim_strides[DimIndexArgs::kOut], sds = a.dim_strides[DimIndexArgs::kSrc];
  const int64_t ids = a.dim_strides[DimIndexArgs::kIndex];
#pragma omp parallel for schedule(static) if (a.n_pos * a.len > 32768 && nblocks > 1)
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t p0 = blk * kBlock, p1 = std::min(a.n_pos, p0 + kBlock);
    std::array<std::array<int64_t, kBlock>, 3> off;
    for (int64_t p = p0; p < p1; ++p)
      for (int op = 0; op < 3; ++op) off[op][p - p0] = a.offset(op, p);
    for (int64_t j = 0; j < a.len; ++j) {
      for (int64_t p = 0; p < p1 - p0; ++p) {
        const int64_t v = a.index[off[DimIndexArgs::kIndex][p] + j * ids];
        if (accumulate) {
          T& dst = out[off[DimIndexArgs::kOut][p] + v * ods];
          const T s = src[off[DimIndexArgs::kSrc][p] + j * sds];
          if constexpr (std::is_same_v<T, bool>) dst = dst || s;
          else dst = static_cast<T>(static_cast<compute_t<T>>(dst) + static_cast<compute_t<T>>(s));
        } else {
          out[off[DimIndexArgs::kOut][p] + j * ods] = src[off[DimIndexArgs::kSrc][p] + v * sds];
        }
      }
    }
  }
}

void dim_index_cpu(const DimIndexArgs& a, bool accumulate) {
  if (a.n_pos == 0 || a.len == 0) return;
  FG_DISPATCH_ALL_TYPES(a.dtype, "index kernel", [&]<class T>() { dim_index_typed<T>(a, accumulate); });
}

}  // namespace

FG_REGISTER_KERNEL(dim_index_stub, CPU, dim_index_cpu);

}  // namespace fg
