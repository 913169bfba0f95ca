#include "flexgrad/ops/reduce_layout.h"

namespace fg {

namespace {
// Drops size-1 dims and merges dim d into its outer neighbour when every stride list allows it.
struct DimGroup {
  std::vector<int64_t> sizes;
  std::vector<std::array<int64_t, 2>> strides;  // [in, out]
  void push(int64_t size, int64_t in_stride, int64_t out_stride) {
    if (size == 1) return;
    if (!sizes.empty() && strides.back()[0] == in_stride * size && strides.back()[1] == out_stride * size) {
      sizes.back() *= size;
      strides.back() = {in_stride, out_stride};
      return;
    }
    sizes.push_back(size);
    strides.push_back({in_stride, out_stride});
  }
};
}  // namespace

ReduceLayout make_reduce_layout(const Tensor& in, const std::vector<bool>& reduced, const Shape& out_strides) {
  FG_ASSERT(static_cast<int64_t>(reduced.size()) == in.dim() && out_strides.size() == reduced.size());
  DimGroup kept, red;
  for (int64_t d = 0; d < in.dim(); ++d) {
    (reduced[d] ? red : kept).push(in.sizes()[d], in.strides()[d], out_strides[d]);
  }
  FG_CHECK(kept.sizes.size() <= ReduceLayout::kMaxDims && red.sizes.size() <= ReduceLayout::kMaxDims,
           NotImplementedError, "reductions support at most {} non-mergeable dimensions (input shape {})",
           ReduceLayout::kMaxDims, shape_str(in.sizes()));
  ReduceLayout l;
  l.kept_ndim = static_cast<int>(kept.sizes.size());
  for (int i = 0; i < l.kept_ndim; ++i) {
    l.kept_sizes[i] = kept.sizes[i];
    l.kept_in_strides[i] = kept.strides[i][0];
    l.kept_out_strides[i] = kept.strides[i][1];
    l.n_out *= kept.sizes[i];
  }
  l.red_ndim = static_cast<int>(red.sizes.size());
  for (int i = 0; i < l.red_ndim; ++i) {
    l.red_sizes[i] = red.sizes[i];
    l.red_in_strides[i] = red.strides[i][0];
    l.red_out_strides[i] = red.strides[i][1];
    l.n_red *= red.sizes[i];
  }
  // An empty input reduces nothing (or has no outputs); keep the counts exact.
  for (int64_t d = 0; d < in.dim(); ++d) {
    if (in.sizes()[d] == 0) {
      if (reduced[d]) l.n_red = 0;
      else l.n_out = 0;
    }
  }
  return l;
}

std::vector<bool> reduce_dims_mask(const Shape& dims, int64_t ndim, const char* op) {
  std::vector<bool> mask(ndim, dims.empty());
  for (int64_t d : dims) {
    int64_t w = wrap_dim(d, ndim, op);
    if (ndim == 0) continue;  // a 0-d tensor accepts dim 0/-1 and reduces nothing
    FG_CHECK(!mask[w], IndexError, "{}: dim {} appears multiple times in the list of dims {}", op, w, shape_str(dims));
    mask[w] = true;
  }
  return mask;
}

Shape reduced_shape(const Shape& sizes, const std::vector<bool>& mask, bool keepdim) {
  Shape out;
  for (size_t d = 0; d < sizes.size(); ++d) {
    if (!mask[d]) out.push_back(sizes[d]);
    else if (keepdim) out.push_back(1);
  }
  return out;
}

}  // namespace fg
