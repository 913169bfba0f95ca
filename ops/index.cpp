// Indexing, gathering and joining (ops/index.h). index_select/gather/index_add/scatter_add fill a
// DimIndexArgs for dim_index_stub after validating every index value here (kernels then never fail);
// their backwards are each other: select <-> index_add, gather <-> scatter_add, all deterministic.
// The rest are compositions of differentiable ops.
#include "flexgrad/ops/index.h"

#include "flexgrad/autograd/record.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/embedding_kernels.h"
#include "flexgrad/ops/index_kernels.h"
#include "flexgrad/ops/reduce.h"
#include "flexgrad/ops/view.h"

namespace fg {

FG_DEFINE_STUB(DimIndexKernelFn, dim_index_stub);
FG_DEFINE_STUB(EmbeddingBwdFn, embedding_bwd_stub);

namespace {

void check_index_dtype(const Tensor& index, const char* op, const char* arg = "index") {
  FG_CHECK(index.defined(), ValueError, "{}: {} is undefined", op, arg);
  FG_CHECK(index.dtype() == kInt64 || index.dtype() == kInt32, DTypeError,
           "{}: expected {} of dtype int64 or int32, got {}", op, arg, index.dtype());
}

// Contiguous int64 copy of an index, with every value checked against [0, size).
Tensor checked_index(const Tensor& index, int64_t size, int64_t dim, const char* op) {
  Tensor idx = index.dtype() == kInt64 ? contiguous(index.detach()) : cast(index.detach(), kInt64);
  if (idx.numel() == 0) return idx;
  int64_t lo = amin(idx).item<int64_t>(), hi = amax(idx).item<int64_t>();
  int64_t bad = lo < 0 ? lo : hi;
  FG_CHECK(lo >= 0 && hi < size, IndexError, "{}: index {} is out of bounds for dimension {} with size {}", op, bad, dim,
           size);
  return idx;
}

// Fills the position dims (every dim but `dim`) of an iteration over `iter_sizes`, with the three
// operands' strides; an operand given an empty stride list does not move with the positions.
DimIndexArgs make_args(const Shape& iter_sizes, int64_t dim, const Tensor& out, const Tensor& src,
                       const Tensor& index, bool index_moves) {
  DimIndexArgs a;
  FG_CHECK(static_cast<int>(iter_sizes.size()) <= DimIndexArgs::kMaxDims + 1, NotImplementedError,
           "index ops support at most {} dims", DimIndexArgs::kMaxDims);
  for (int64_t d = 0; d < static_cast<int64_t>(iter_sizes.size()); ++d) {
    if (d == dim) continue;
    a.sizes[a.ndim] = iter_sizes[d];
    a.strides[DimIndexArgs::kOut][a.ndim] = out.strides()[d];
    a.strides[DimIndexArgs::kSrc][a.ndim] = src.strides()[d];
    a.strides[DimIndexArgs::kIndex][a.ndim] = index_moves ? index.strides()[d] : 0;
    a.n_pos *= iter_sizes[d];
    ++a.ndim;
  }
  const bool has_dim = !iter_sizes.empty();
  a.len = has_dim ? iter_sizes[dim] : 1;
  a.dim_strides = {has_dim && out.dim() ? out.strides()[dim] : 0, has_dim && src.dim() ? src.strides()[dim] : 0,
                   index_moves ? (index.dim() ? index.strides()[dim] : 0) : (index.dim() ? index.strides()[0] : 0)};
  a.dtype = out.dtype();
  a.out = out.data_ptr();
  a.src = src.data_ptr();
  a.index = index.data<int64_t>();
  return a;
}

// index_select without autograd.
Tensor index_select_raw(const Tensor& t, int64_t d, const Tensor& idx) {
  Shape os = t.sizes();
  if (t.dim() > 0) os[d] = idx.numel();
  Tensor out = empty(os, t.options());
  if (out.numel() > 0) dim_index_stub(t.device(), make_args(os, d, out, t, idx, false), false);
  return out;
}

// index_add without autograd: a copy of t with src's slices added at idx along d.
Tensor index_add_raw(const Tensor& t, int64_t d, const Tensor& idx, const Tensor& src) {
  Tensor out = clone(t.detach());
  if (src.numel() > 0) dim_index_stub(t.device(), make_args(src.sizes(), d, out, src, idx, false), true);
  return out;
}

Tensor gather_raw(const Tensor& t, int64_t d, const Tensor& idx) {
  Tensor out = empty(idx.sizes(), t.options());
  if (out.numel() > 0) dim_index_stub(t.device(), make_args(idx.sizes(), d, out, t, idx, true), false);
  return out;
}

Tensor scatter_add_raw(const Tensor& t, int64_t d, const Tensor& idx, const Tensor& src) {
  Tensor out = clone(t.detach());
  if (idx.numel() > 0) dim_index_stub(t.device(), make_args(idx.sizes(), d, out, src, idx, true), true);
  return out;
}

// gather/scatter_add share PyTorch's shape rule: index has t's rank and is no larger than t (and src)
// in every dim other than d.
void check_gather_shapes(const Tensor& t, int64_t d, const Tensor& index, const Tensor* src, const char* op) {
  FG_CHECK(index.dim() == t.dim(), ShapeError, "{}: index {} must have as many dims as the input {}", op,
           shape_str(index.sizes()), shape_str(t.sizes()));
  for (int64_t i = 0; i < t.dim(); ++i) {
    FG_CHECK(i == d || index.sizes()[i] <= t.sizes()[i], ShapeError,
             "{}: index {} is larger than the input {} in dimension {}", op, shape_str(index.sizes()),
             shape_str(t.sizes()), i);
    FG_CHECK(!src || index.sizes()[i] <= src->sizes()[i], ShapeError,
             "{}: index {} is larger than src {} in dimension {}", op, shape_str(index.sizes()),
             shape_str(src->sizes()), i);
  }
}

}  // namespace

Tensor index_select(const Tensor& t, int64_t dim, const Tensor& index) {
  check_index_dtype(index, "index_select");
  FG_CHECK(index.dim() <= 1, ShapeError, "index_select: index must be 0-D or 1-D, got shape {}", shape_str(index.sizes()));
  const int64_t d = wrap_dim(dim, t.dim(), "index_select");
  const int64_t size = t.dim() ? t.sizes()[d] : 1;
  Tensor idx = checked_index(index.reshape({-1}), size, d, "index_select");
  Tensor out = index_select_raw(t, d, idx);
  if (needs_grad({t})) {
    record("IndexSelectBackward", {t}, {out}, [shape = t.sizes(), d, idx](const TensorList& g) {
      return TensorList{index_add_raw(zeros(shape, g[0].options()), d, idx, g[0])};
    });
  }
  return out;
}

Tensor index_add(const Tensor& t, int64_t dim, const Tensor& index, const Tensor& src) {
  check_index_dtype(index, "index_add");
  FG_CHECK(t.dtype() == src.dtype(), DTypeError, "index_add: self ({}) and src ({}) must have the same dtype", t.dtype(),
           src.dtype());
  const int64_t d = wrap_dim(dim, t.dim(), "index_add");
  FG_CHECK(index.dim() <= 1, ShapeError, "index_add: index must be 0-D or 1-D, got shape {}", shape_str(index.sizes()));
  Shape expect = t.sizes();
  if (t.dim()) expect[d] = index.numel();
  FG_CHECK(src.sizes() == expect, ShapeError,
           "index_add: src shape {} must equal self shape {} with dimension {} replaced by the index length {}",
           shape_str(src.sizes()), shape_str(t.sizes()), d, index.numel());
  Tensor idx = checked_index(index.reshape({-1}), t.dim() ? t.sizes()[d] : 1, d, "index_add");
  Tensor out = index_add_raw(t, d, idx, src);
  if (needs_grad({t, src})) {
    record("IndexAddBackward", {t, src}, {out}, [d, idx](const TensorList& g) {
      return TensorList{g[0], index_select_raw(g[0], d, idx)};
    });
  }
  return out;
}

Tensor gather(const Tensor& t, int64_t dim, const Tensor& index) {
  check_index_dtype(index, "gather");
  const int64_t d = wrap_dim(dim, t.dim(), "gather");
  check_gather_shapes(t, d, index, nullptr, "gather");
  Tensor idx = checked_index(index, t.dim() ? t.sizes()[d] : 1, d, "gather");
  Tensor out = gather_raw(t, d, idx);
  if (needs_grad({t})) {
    record("GatherBackward", {t}, {out}, [shape = t.sizes(), d, idx](const TensorList& g) {
      return TensorList{scatter_add_raw(zeros(shape, g[0].options()), d, idx, g[0])};
    });
  }
  return out;
}

Tensor scatter_add(const Tensor& t, int64_t dim, const Tensor& index, const Tensor& src) {
  check_index_dtype(index, "scatter_add");
  FG_CHECK(t.dtype() == src.dtype(), DTypeError, "scatter_add: self ({}) and src ({}) must have the same dtype",
           t.dtype(), src.dtype());
  const int64_t d = wrap_dim(dim, t.dim(), "scatter_add");
  FG_CHECK(src.dim() == t.dim(), ShapeError, "scatter_add: src {} must have as many dims as self {}",
           shape_str(src.sizes()), shape_str(t.sizes()));
  check_gather_shapes(t, d, index, &src, "scatter_add");
  Tensor idx = checked_index(index, t.dim() ? t.sizes()[d] : 1, d, "scatter_add");
  Tensor out = scatter_add_raw(t, d, idx, src);
  if (needs_grad({t, src})) {
    record("ScatterAddBackward", {t, src}, {out}, [d, idx, src_shape = src.sizes()](const TensorList& g) {
      // src elements beyond the index's extent were never read: they get zero gradient.
      Tensor gs = gather_raw(g[0], d, idx);
      if (gs.sizes() != src_shape) {
        Tensor full = zeros(src_shape, gs.options());
        Tensor region = full;
        for (int64_t i = 0; i < static_cast<int64_t>(src_shape.size()); ++i) region = narrow(region, i, 0, gs.sizes()[i]);
        region.copy_(gs);
        gs = full;
      }
      return TensorList{g[0], gs};
    });
  }
  return out;
}

Tensor embedding(const Tensor& weight, const Tensor& indices) {
  check_index_dtype(indices, "embedding", "indices");
  FG_CHECK(weight.dim() == 2, ShapeError, "embedding: weight must be 2-D [num_embeddings, embedding_dim], got {}",
           shape_str(weight.sizes()));
  Shape out_shape = indices.sizes();
  out_shape.push_back(weight.size(1));
  Tensor idx = checked_index(reshape(indices, {-1}), weight.size(0), 0, "embedding");
  Tensor rows = index_select_raw(weight, 0, idx);
  if (needs_grad({weight})) {
    // Deterministic either way: a device with an embedding_bwd_stub kernel sorts the ids and sums each id's
    // rows in token order; elsewhere index_add walks the tokens in order for each column (the same sums).
    record("EmbeddingBackward", {weight}, {rows}, [shape = weight.sizes(), idx](const TensorList& g) {
      const Device dev = g[0].device();
      if (!embedding_bwd_stub.has(dev.type)) return TensorList{index_add_raw(zeros(shape, g[0].options()), 0, idx, g[0])};
      Tensor gy = contiguous(g[0]);
      Tensor out = empty(shape, gy.options());
      EmbeddingBwdArgs a;
      a.tokens = idx.numel();
      a.num_embeddings = shape[0];
      a.dim = shape[1];
      a.dtype = gy.dtype();
      a.index = idx.data<int64_t>();
      a.grad = gy.data_ptr();
      a.out = out.data_ptr();
      embedding_bwd_stub(dev, a);
      return TensorList{out};
    });
  }
  return reshape(rows, out_shape);
}

Tensor cat(const TensorList& tensors, int64_t dim) {
  FG_CHECK(!tensors.empty(), ValueError, "cat: expected a non-empty list of tensors");
  // As PyTorch, 1-D empty tensors are skipped whatever the other shapes (legacy behaviour).
  TensorList parts;
  DType dtype = tensors[0].dtype();
  for (const auto& t : tensors) {
    FG_CHECK(t.defined(), ValueError, "cat: got an undefined tensor");
    dtype = promote_types(dtype, t.dtype());
    if (!(t.dim() == 1 && t.numel() == 0)) parts.push_back(t);
  }
  if (parts.empty()) return empty({0}, tensors[0].options().dtype(dtype));
  const Tensor& ref = parts[0];
  FG_CHECK(ref.dim() > 0, ShapeError, "cat: zero-dimensional tensor (at position 0) cannot be concatenated");
  const int64_t d = wrap_dim(dim, ref.dim(), "cat");
  Shape out_shape = ref.sizes();
  out_shape[d] = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Tensor& t = parts[i];
    FG_CHECK(t.device() == ref.device(), DeviceError, "cat: tensors on different devices ({} and {})", ref.device(),
             t.device());
    FG_CHECK(t.dim() == ref.dim(), ShapeError, "cat: tensors must have the same number of dims: {} vs {} (tensor {})",
             shape_str(ref.sizes()), shape_str(t.sizes()), i);
    for (int64_t k = 0; k < t.dim(); ++k) {
      FG_CHECK(k == d || t.sizes()[k] == ref.sizes()[k], ShapeError,
               "cat: sizes of tensors must match except in dimension {}: {} vs {} (tensor {}, dimension {})", d,
               shape_str(ref.sizes()), shape_str(t.sizes()), i, k);
    }
    out_shape[d] += t.sizes()[d];
  }
  Tensor out = empty(out_shape, ref.options().dtype(dtype));
  Shape offsets;
  {
    NoGradGuard no_grad;
    int64_t off = 0;
    for (const auto& t : parts) {
      offsets.push_back(off);
      narrow(out, d, off, t.sizes()[d]).copy_(t);  // copy_ casts to the promoted dtype
      off += t.sizes()[d];
    }
  }
  if (needs_grad(parts)) {
    std::vector<DType> dtypes;
    Shape lens;
    for (const auto& t : parts) { dtypes.push_back(t.dtype()); lens.push_back(t.sizes()[d]); }
    record("CatBackward", parts, {out}, [d, offsets, lens, dtypes](const TensorList& g) {
      TensorList grads;
      for (size_t i = 0; i < lens.size(); ++i) {
        Tensor gi = narrow(g[0], d, offsets[i], lens[i]);
        grads.push_back(is_floating(dtypes[i]) ? (gi.dtype() == dtypes[i] ? gi : cast(gi, dtypes[i])) : Tensor());
      }
      return grads;
    });
  }
  return out;
}

Tensor stack(const TensorList& tensors, int64_t dim) {
  FG_CHECK(!tensors.empty(), ValueError, "stack: expected a non-empty list of tensors");
  const int64_t d = wrap_dim(dim, tensors[0].dim() + 1, "stack");
  TensorList parts;
  for (size_t i = 0; i < tensors.size(); ++i) {
    FG_CHECK(tensors[i].sizes() == tensors[0].sizes(), ShapeError,
             "stack: expects each tensor to be equal size, but got {} at entry 0 and {} at entry {}",
             shape_str(tensors[0].sizes()), shape_str(tensors[i].sizes()), i);
    parts.push_back(unsqueeze(tensors[i], d));
  }
  return cat(parts, d);
}

Tensor index(const Tensor& t, const Tensor& idx) {
  FG_CHECK(idx.defined(), ValueError, "index: the index tensor is undefined");
  if (idx.dtype() == kBool) {
    FG_CHECK(idx.sizes() == t.sizes(), ShapeError, "index: a bool mask must have the indexed tensor's shape {}, got {}",
             shape_str(t.sizes()), shape_str(idx.sizes()));
    return masked_select(t, idx);
  }
  check_index_dtype(idx, "index");
  FG_CHECK(t.dim() >= 1, IndexError, "index: cannot index a 0-d tensor with a tensor");
  const int64_t n = t.sizes()[0];
  // Advanced indexing accepts negative indices (counting from the end); index_select does not.
  Tensor i64 = cast(idx.detach(), kInt64);
  if (i64.numel() > 0) {
    int64_t lo = amin(i64).item<int64_t>(), hi = amax(i64).item<int64_t>();
    FG_CHECK(lo >= -n && hi < n, IndexError, "index: index {} is out of bounds for dimension 0 with size {}",
             lo < -n ? lo : hi, n);
    i64 = where(lt(i64, scalar_tensor(0, kInt64)), add(i64, scalar_tensor(n, kInt64)), i64);
  }
  Shape out_shape = idx.sizes();
  out_shape.insert(out_shape.end(), t.sizes().begin() + 1, t.sizes().end());
  return reshape(index_select(t, 0, reshape(i64, {-1})), out_shape);
}

Tensor masked_select(const Tensor& t, const Tensor& mask) {
  FG_CHECK(mask.defined() && mask.dtype() == kBool, DTypeError, "masked_select: expected a bool mask, got {}",
           mask.defined() ? dtype_name(mask.dtype()) : "undefined");
  Shape shape = broadcast_shapes(t.sizes(), mask.sizes(), "masked_select");
  // The selected flat positions are found on the host; selecting them is an index_select of the
  // broadcast input, which also provides the backward (an index_add into the positions).
  Tensor m = contiguous(expand(mask, shape)).cpu();
  const bool* mp = m.data<bool>();
  std::vector<int64_t> pos;
  for (int64_t i = 0; i < m.numel(); ++i) if (mp[i]) pos.push_back(i);
  Tensor idx = from_vector(pos, {static_cast<int64_t>(pos.size())}, TensorOptions(kInt64)).to(t.device());
  return index_select(reshape(expand(t, shape), {-1}), 0, idx);
}

Tensor one_hot(const Tensor& indices, int64_t num_classes) {
  check_index_dtype(indices, "one_hot", "indices");
  Tensor idx = cast(indices.detach(), kInt64);
  if (num_classes < 0) {
    FG_CHECK(idx.numel() > 0, ValueError, "one_hot: cannot infer num_classes from an empty tensor");
    num_classes = amax(idx).item<int64_t>() + 1;
  }
  if (idx.numel() > 0) {
    int64_t lo = amin(idx).item<int64_t>(), hi = amax(idx).item<int64_t>();
    FG_CHECK(lo >= 0 && hi < num_classes, IndexError, "one_hot: class index {} is out of range for num_classes {}",
             lo < 0 ? lo : hi, num_classes);
  }
  Tensor classes = arange(0, static_cast<double>(num_classes), 1, TensorOptions(kInt64).device(idx.device()));
  return cast(eq(unsqueeze(idx, -1), classes), kInt64);
}

namespace {
// Keeps t[..., i, j] where (j - i) compares to `diagonal` (lower: j - i <= diagonal), zero elsewhere.
Tensor triangle(const Tensor& t, int64_t diagonal, bool lower, const char* op) {
  FG_CHECK(t.dim() >= 2, ShapeError, "{}: expected a tensor with at least 2 dims, got shape {}", op, shape_str(t.sizes()));
  const int64_t r = t.size(-2), c = t.size(-1);
  auto opts = TensorOptions(kInt64).device(t.device());
  Tensor offset = sub(unsqueeze(arange(0, static_cast<double>(c), 1, opts), 0),
                      unsqueeze(arange(0, static_cast<double>(r), 1, opts), 1));  // j - i, [r, c]
  Tensor keep = lower ? le(offset, scalar_tensor(diagonal, kInt64)) : ge(offset, scalar_tensor(diagonal, kInt64));
  return where(keep, t, zeros({}, t.options()));
}
}  // namespace

Tensor tril(const Tensor& t, int64_t diagonal) { return triangle(t, diagonal, true, "tril"); }
Tensor triu(const Tensor& t, int64_t diagonal) { return triangle(t, diagonal, false, "triu"); }

}  // namespace fg
