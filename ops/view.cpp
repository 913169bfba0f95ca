// Differentiable views. Each computes the new layout over the same storage; the backward maps the
// gradient of the view back onto the shape of its input. Every output is also marked as a view of its
// input's root base (autograd/view.h), which is what makes in-place writes through it differentiable.
#include "flexgrad/ops/view.h"

#include <algorithm>
#include <numeric>

#include "flexgrad/autograd/record.h"
#include "flexgrad/autograd/view.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/reduce.h"

namespace fg {

namespace {

// Records a view's backward (single input, single output; only the input's shape is kept) and tracks the
// output as a view of t's base.
Tensor make_view(const Tensor& t, Shape sizes, Shape strides, int64_t offset, const char* name,
                 std::function<Tensor(const Tensor& g, const Shape& in_shape)> backward) {
  Tensor out = t.alias_with_layout(std::move(sizes), std::move(strides), offset);
  if (needs_grad({t})) {
    record(name, {t}, {out}, [bw = std::move(backward), shape = t.sizes()](const TensorList& g) {
      return TensorList{bw(g[0], shape)};
    });
  }
  set_view_of(out, t);
  return out;
}

}  // namespace

Shape infer_size(const Shape& shape, int64_t numel, const char* op) {
  Shape out = shape;
  int64_t known = 1;
  int infer = -1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      FG_CHECK(infer < 0, ShapeError, "{}: only one dimension can be inferred (shape {})", op, shape_str(shape));
      infer = static_cast<int>(i);
    } else {
      FG_CHECK(shape[i] >= 0, ShapeError, "{}: invalid shape dimension {} in {}", op, shape[i], shape_str(shape));
      known *= shape[i];
    }
  }
  if (infer >= 0) {
    FG_CHECK(known != 0 && numel % known == 0, ShapeError, "{}: shape {} is invalid for input of size {}", op,
             shape_str(shape), numel);
    out[infer] = numel / known;
  } else {
    FG_CHECK(known == numel, ShapeError, "{}: shape {} is invalid for input of size {}", op, shape_str(shape), numel);
  }
  return out;
}

std::optional<Shape> view_strides(const Shape& old_sizes, const Shape& old_strides, const Shape& sizes) {
  // Walk chunks of old dims that are contiguous among themselves and match them with new dims.
  Shape strides(sizes.size());
  if (shape_numel(old_sizes) == 0 || old_sizes.empty()) {
    return contiguous_strides(sizes);
  }
  int64_t view_d = static_cast<int64_t>(sizes.size()) - 1;
  int64_t chunk_base_stride = old_strides.back();
  int64_t tensor_numel = 1, view_numel = 1;
  for (int64_t d = static_cast<int64_t>(old_sizes.size()) - 1; d >= 0; --d) {
    tensor_numel *= old_sizes[d];
    if (d == 0 || (old_sizes[d - 1] != 1 && old_strides[d - 1] != tensor_numel * chunk_base_stride)) {
      while (view_d >= 0 && (view_numel < tensor_numel || sizes[view_d] == 1)) {
        strides[view_d] = view_numel * chunk_base_stride;
        view_numel *= sizes[view_d];
        --view_d;
      }
      if (view_numel != tensor_numel) return std::nullopt;
      if (d > 0) {
        chunk_base_stride = old_strides[d - 1];
        tensor_numel = 1;
        view_numel = 1;
      }
    }
  }
  if (view_d != -1) return std::nullopt;
  return strides;
}

Tensor view(const Tensor& t, const Shape& shape) {
  Shape sizes = infer_size(shape, t.numel(), "view");
  auto strides = view_strides(t.sizes(), t.strides(), sizes);
  FG_CHECK(strides.has_value(), ShapeError,
           "view: size {} is not compatible with input tensor's size {} and stride {} (at least one dimension "
           "spans across two contiguous subspaces); use reshape instead",
           shape_str(sizes), shape_str(t.sizes()), shape_str(t.strides()));
  return make_view(t, sizes, *strides, t.storage_offset(), "ViewBackward",
                   [](const Tensor& g, const Shape& in) { return reshape(g, in); });
}

Tensor reshape(const Tensor& t, const Shape& shape) {
  Shape sizes = infer_size(shape, t.numel(), "reshape");
  if (view_strides(t.sizes(), t.strides(), sizes)) return view(t, sizes);
  return view(clone(t), sizes);
}

Tensor permute(const Tensor& t, const Shape& dims) {
  const int64_t n = t.dim();
  FG_CHECK(static_cast<int64_t>(dims.size()) == n, ShapeError,
           "permute: number of dims don't match (input has {} dims, permutation {} has {})", n, shape_str(dims),
           dims.size());
  Shape sizes(n), strides(n), inverse(n);
  std::vector<bool> seen(n, false);
  for (int64_t i = 0; i < n; ++i) {
    int64_t d = wrap_dim(dims[i], n, "permute");
    FG_CHECK(!seen[d], ShapeError, "permute: repeated dim {} in {}", d, shape_str(dims));
    seen[d] = true;
    sizes[i] = t.sizes()[d];
    strides[i] = t.strides()[d];
    inverse[d] = i;
  }
  return make_view(t, sizes, strides, t.storage_offset(), "PermuteBackward",
                   [inverse](const Tensor& g, const Shape&) { return permute(g, inverse); });
}

Tensor transpose(const Tensor& t, int64_t d0, int64_t d1) {
  const int64_t n = t.dim();
  if (n == 0) return t;
  d0 = wrap_dim(d0, n, "transpose");
  d1 = wrap_dim(d1, n, "transpose");
  Shape perm(n);
  std::iota(perm.begin(), perm.end(), 0);
  std::swap(perm[d0], perm[d1]);
  return permute(t, perm);
}

Tensor unsqueeze(const Tensor& t, int64_t d) {
  d = wrap_dim(d, t.dim() + 1, "unsqueeze");
  Shape sizes = t.sizes(), strides = t.strides();
  int64_t st = d < t.dim() ? sizes[d] * strides[d] : 1;
  sizes.insert(sizes.begin() + d, 1);
  strides.insert(strides.begin() + d, st);
  return make_view(t, sizes, strides, t.storage_offset(), "UnsqueezeBackward",
                   [](const Tensor& g, const Shape& in) { return reshape(g, in); });
}

Tensor squeeze(const Tensor& t) {
  Shape sizes, strides;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.sizes()[d] != 1) {
      sizes.push_back(t.sizes()[d]);
      strides.push_back(t.strides()[d]);
    }
  }
  return make_view(t, sizes, strides, t.storage_offset(), "SqueezeBackward",
                   [](const Tensor& g, const Shape& in) { return reshape(g, in); });
}

Tensor squeeze(const Tensor& t, int64_t d) {
  if (t.dim() == 0) return t;
  d = wrap_dim(d, t.dim(), "squeeze");
  if (t.sizes()[d] != 1) return t;
  Shape sizes = t.sizes(), strides = t.strides();
  sizes.erase(sizes.begin() + d);
  strides.erase(strides.begin() + d);
  return make_view(t, sizes, strides, t.storage_offset(), "SqueezeBackward",
                   [](const Tensor& g, const Shape& in) { return reshape(g, in); });
}

namespace {
// Backward of views that pick a sub-block of the input: scatter g into zeros of the input's shape.
Tensor embed_in_zeros(const Tensor& g, const Shape& in_shape, const std::function<Tensor(const Tensor&)>& same_view) {
  Tensor z = zeros(in_shape, g.options());
  Tensor dst = same_view(z);
  copy_(dst, g);
  return z;
}
}  // namespace

Tensor slice(const Tensor& t, int64_t d, int64_t start, int64_t end, int64_t step) {
  FG_CHECK(t.dim() > 0, IndexError, "slice: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, t.dim(), "slice");
  FG_CHECK(step > 0, ValueError, "slice: step must be positive, got {}", step);
  const int64_t n = t.sizes()[d];
  // Python slicing semantics: negative indices count from the end, out-of-range bounds are clamped.
  if (start < 0) start += n;
  if (end < 0) end += n;
  start = std::clamp<int64_t>(start, 0, n);
  end = std::clamp<int64_t>(end, start, n);
  Shape sizes = t.sizes(), strides = t.strides();
  sizes[d] = (end - start + step - 1) / step;
  strides[d] *= step;
  int64_t offset = t.storage_offset() + start * t.strides()[d];
  return make_view(t, sizes, strides, offset, "SliceBackward", [d, start, end, step](const Tensor& g, const Shape& in) {
    return embed_in_zeros(g, in, [&](const Tensor& z) { return slice(z, d, start, end, step); });
  });
}

Tensor narrow(const Tensor& t, int64_t d, int64_t start, int64_t length) {
  FG_CHECK(t.dim() > 0, IndexError, "narrow: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, t.dim(), "narrow");
  const int64_t n = t.sizes()[d];
  if (start < 0) start += n;
  FG_CHECK(start >= 0 && length >= 0 && start + length <= n, IndexError,
           "narrow: start ({}) + length ({}) exceeds dimension size ({}) of dim {} (shape {})", start, length, n, d,
           shape_str(t.sizes()));
  return slice(t, d, start, start + length, 1);
}

Tensor select(const Tensor& t, int64_t d, int64_t index) {
  FG_CHECK(t.dim() > 0, IndexError, "select: cannot be applied to a 0-dim tensor");
  d = wrap_dim(d, t.dim(), "select");
  const int64_t n = t.sizes()[d];
  FG_CHECK(index >= -n && index < n, IndexError,
           "select: index {} out of range for tensor of size {} at dimension {}", index, shape_str(t.sizes()), d);
  if (index < 0) index += n;
  Shape sizes = t.sizes(), strides = t.strides();
  int64_t offset = t.storage_offset() + index * strides[d];
  sizes.erase(sizes.begin() + d);
  strides.erase(strides.begin() + d);
  return make_view(t, sizes, strides, offset, "SelectBackward", [d, index](const Tensor& g, const Shape& in) {
    return embed_in_zeros(g, in, [&](const Tensor& z) { return select(z, d, index); });
  });
}

Tensor expand(const Tensor& t, const Shape& shape) {
  FG_CHECK(shape.size() >= static_cast<size_t>(t.dim()), ShapeError,
           "expand: the number of sizes provided ({}) must be greater or equal to the number of dimensions in the "
           "tensor ({}); shape {} -> {}", shape.size(), t.dim(), shape_str(t.sizes()), shape_str(shape));
  const int64_t n = static_cast<int64_t>(shape.size()), off = n - t.dim();
  Shape sizes(n), strides(n);
  for (int64_t i = n - 1; i >= 0; --i) {
    int64_t want = shape[i];
    if (i >= off) {
      int64_t have = t.sizes()[i - off];
      if (want == -1) want = have;
      FG_CHECK(have == want || have == 1, ShapeError,
               "expand: the expanded size of the tensor ({}) must match the existing size ({}) at non-singleton "
               "dimension {}; target sizes {}, tensor sizes {}", want, have, i, shape_str(shape), shape_str(t.sizes()));
      sizes[i] = want;
      strides[i] = have == want ? t.strides()[i - off] : 0;
    } else {
      FG_CHECK(want >= 0, ShapeError, "expand: -1 is not allowed in a leading, non-existing dimension ({})",
               shape_str(shape));
      sizes[i] = want;
      strides[i] = 0;
    }
  }
  if (sizes == t.sizes()) return t;
  return make_view(t, sizes, strides, t.storage_offset(), "ExpandBackward",
                   [](const Tensor& g, const Shape& in) { return sum_to_shape(g, in); });
}

Tensor as_strided(const Tensor& t, const Shape& sizes, const Shape& strides, int64_t storage_offset) {
  FG_CHECK(sizes.size() == strides.size(), ShapeError, "as_strided: sizes {} and strides {} differ in length",
           shape_str(sizes), shape_str(strides));
  int64_t offset = storage_offset < 0 ? t.storage_offset() : storage_offset;
  int64_t max_elem = offset;
  for (size_t i = 0; i < sizes.size(); ++i) {
    FG_CHECK(sizes[i] >= 0 && strides[i] >= 0, ShapeError, "as_strided: negative size or stride in {} / {}",
             shape_str(sizes), shape_str(strides));
    if (sizes[i] == 0) { max_elem = -1; break; }
    max_elem += (sizes[i] - 1) * strides[i];
  }
  FG_CHECK(max_elem < static_cast<int64_t>(t.storage()->nbytes() / t.element_size()), ShapeError,
           "as_strided: setting a storage of {} elements with sizes {}, strides {} and offset {} is out of bounds",
           t.storage()->nbytes() / t.element_size(), shape_str(sizes), shape_str(strides), offset);
  // Backward: scatter-add each output element into the input element at the same storage position.
  // Supported when the input itself is laid out contiguously in its storage.
  bool input_contiguous = t.is_contiguous();
  int64_t in_offset = t.storage_offset();
  return make_view(t, sizes, strides, offset, "AsStridedBackward",
                   [sizes, strides, offset, in_offset, input_contiguous](const Tensor& g, const Shape& in) {
                     FG_CHECK(input_contiguous, NotImplementedError,
                              "as_strided backward: the input must be contiguous (shape {})", shape_str(in));
                     Tensor acc = full({}, offset - in_offset, TensorOptions().dtype(kInt64).device(g.device()));
                     Tensor p = acc.expand(sizes);
                     for (size_t d = 0; d < sizes.size(); ++d) {
                       Shape sh(sizes.size(), 1);
                       sh[d] = sizes[d];
                       p = p + arange(0, static_cast<double>(sizes[d]), 1, TensorOptions().dtype(kInt64).device(g.device())).view(sh) * strides[d];
                     }
                     Tensor flat = zeros({shape_numel(in)}, g.options());
                     return index_add(flat, 0, reshape(p, {-1}), reshape(g, {-1})).view(in);
                   });
}

Tensor flatten(const Tensor& t, int64_t start_dim, int64_t end_dim) {
  if (t.dim() == 0) return reshape(t, {1});
  start_dim = wrap_dim(start_dim, t.dim(), "flatten");
  end_dim = wrap_dim(end_dim, t.dim(), "flatten");
  FG_CHECK(start_dim <= end_dim, ValueError, "flatten: start_dim ({}) cannot come after end_dim ({})", start_dim, end_dim);
  Shape sizes(t.sizes().begin(), t.sizes().begin() + start_dim);
  int64_t m = 1;
  for (int64_t d = start_dim; d <= end_dim; ++d) m *= t.sizes()[d];
  sizes.push_back(m);
  sizes.insert(sizes.end(), t.sizes().begin() + end_dim + 1, t.sizes().end());
  return reshape(t, sizes);
}

Tensor unflatten(const Tensor& t, int64_t d, const Shape& sizes) {
  d = wrap_dim(d, t.dim(), "unflatten");
  Shape inner = infer_size(sizes, t.sizes()[d], "unflatten");
  Shape shape(t.sizes().begin(), t.sizes().begin() + d);
  shape.insert(shape.end(), inner.begin(), inner.end());
  shape.insert(shape.end(), t.sizes().begin() + d + 1, t.sizes().end());
  return view(t, shape);
}

namespace {
std::vector<Tensor> split_views(const Tensor& t, const Shape& sizes, int64_t d) {
  d = wrap_dim(d, t.dim(), "split_with_sizes");
  int64_t total = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  FG_CHECK(total == t.sizes()[d], ShapeError,
           "split_with_sizes: split sizes {} sum to {} but dimension {} has size {}", shape_str(sizes), total, d,
           t.sizes()[d]);
  std::vector<Tensor> out;
  int64_t start = 0;
  for (int64_t s : sizes) {
    out.push_back(narrow(t, d, start, s));
    start += s;
  }
  return out;
}
}  // namespace

std::vector<Tensor> split_with_sizes(const Tensor& t, const Shape& sizes, int64_t d) {
  auto out = split_views(t, sizes, d);
  mark_multi_output_views(out, "split_with_sizes");
  return out;
}

std::vector<Tensor> split(const Tensor& t, int64_t split_size, int64_t d) {
  d = wrap_dim(d, t.dim(), "split");
  FG_CHECK(split_size > 0 || (split_size == 0 && t.sizes()[d] == 0), ValueError,
           "split: split_size must be positive, got {}", split_size);
  Shape sizes;
  for (int64_t start = 0; start < t.sizes()[d]; start += split_size) sizes.push_back(std::min(split_size, t.sizes()[d] - start));
  auto out = split_views(t, sizes, d);
  mark_multi_output_views(out, "split");
  return out;
}

std::vector<Tensor> chunk(const Tensor& t, int64_t chunks, int64_t d) {
  FG_CHECK(chunks > 0, ValueError, "chunk: number of chunks must be positive, got {}", chunks);
  d = wrap_dim(d, t.dim(), "chunk");
  int64_t size = (t.sizes()[d] + chunks - 1) / chunks;
  auto out = split(t, std::max<int64_t>(size, 1), d);
  mark_multi_output_views(out, "chunk");
  return out;
}

}  // namespace fg
