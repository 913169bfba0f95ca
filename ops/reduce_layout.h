// ReduceLayout: the iteration space of a reduction or of a row-wise op (softmax, cumsum, sort) over a
// strided input. Dims are split into "kept" dims (one output position each) and "reduced" dims (the
// elements combined into that position). Size-1 dims are dropped and adjacent dims merged where the
// strides allow, so a reduction of a contiguous inner dim becomes one tight row per output. Everything
// is plain integers (element strides), so kernels on every device consume the same description.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

#include "flexgrad/tensor/tensor.h"

namespace fg {

struct ReduceLayout {
  static constexpr int kMaxDims = 16;
  int64_t n_out = 1;  // number of kept positions (product of kept sizes)
  int64_t n_red = 1;  // elements reduced into each position (product of reduced sizes)
  // Kept dims, outermost first; element strides into the input and into the output.
  int kept_ndim = 0;
  std::array<int64_t, kMaxDims> kept_sizes{}, kept_in_strides{}, kept_out_strides{};
  // Reduced dims, outermost first; the last one is the inner loop. red_out_strides is used by row-wise
  // ops whose output has the input's shape (0 for plain reductions).
  int red_ndim = 0;
  std::array<int64_t, kMaxDims> red_sizes{}, red_in_strides{}, red_out_strides{};

  // Element offsets of kept position o (row-major over the kept dims).
  int64_t in_offset(int64_t o) const {
    int64_t off = 0;
    for (int d = kept_ndim - 1; d >= 0; --d) {
      off += (o % kept_sizes[d]) * kept_in_strides[d];
      o /= kept_sizes[d];
    }
    return off;
  }
  int64_t out_offset(int64_t o) const {
    int64_t off = 0;
    for (int d = kept_ndim - 1; d >= 0; --d) {
      off += (o % kept_sizes[d]) * kept_out_strides[d];
      o /= kept_sizes[d];
    }
    return off;
  }
  // Input / output element offsets of reduced element r (row-major over the reduced dims).
  int64_t red_in_offset(int64_t r) const {
    int64_t off = 0;
    for (int d = red_ndim - 1; d >= 0; --d) {
      off += (r % red_sizes[d]) * red_in_strides[d];
      r /= red_sizes[d];
    }
    return off;
  }
  int64_t red_out_offset(int64_t r) const {
    int64_t off = 0;
    for (int d = red_ndim - 1; d >= 0; --d) {
      off += (r % red_sizes[d]) * red_out_strides[d];
      r /= red_sizes[d];
    }
    return off;
  }
  // Size and input stride of the innermost reduced dim (the tight loop).
  int64_t inner_size() const { return red_ndim ? red_sizes[red_ndim - 1] : 1; }
  int64_t inner_in_stride() const { return red_ndim ? red_in_strides[red_ndim - 1] : 0; }
  int64_t inner_out_stride() const { return red_ndim ? red_out_strides[red_ndim - 1] : 0; }
};

// Builds the layout of `in` with reduced[d] marking the reduced dims. out_strides gives, per input dim,
// the output's element stride (for plain reductions: the keepdim output's strides, 0 on reduced dims).
ReduceLayout make_reduce_layout(const Tensor& in, const std::vector<bool>& reduced, const Shape& out_strides);

// Normalises a dims list for op `op` over an ndim tensor: wraps negatives, rejects duplicates (IndexError),
// and returns a mask; an empty list means every dim.
std::vector<bool> reduce_dims_mask(const Shape& dims, int64_t ndim, const char* op);
// Output shape of a reduction with that mask.
Shape reduced_shape(const Shape& sizes, const std::vector<bool>& mask, bool keepdim);

}  // namespace fg
