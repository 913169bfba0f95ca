#include "nn/kv_cache.h"

#include "autograd/grad_mode.h"
#include "ops/elementwise.h"
#include "ops/view.h"

namespace fg::nn {

ContiguousKVCache::ContiguousKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim,
                                     TensorOptions options) {
  FG_CHECK(batch > 0 && kv_heads > 0 && max_len > 0 && head_dim > 0, ValueError,
           "ContiguousKVCache: sizes must be positive, got batch {}, kv_heads {}, max_len {}, head_dim {}", batch,
           kv_heads, max_len, head_dim);
  k_ = zeros({batch, kv_heads, max_len, head_dim}, options.requires_grad(false));
  v_ = zeros({batch, kv_heads, max_len, head_dim}, options.requires_grad(false));
}

std::pair<Tensor, Tensor> ContiguousKVCache::append(const Tensor& k, const Tensor& v) {
  FG_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), ShapeError,
           "KVCache.append: k and v must be [B, Hkv, L, E] of one shape, got {} and {}", shape_str(k.sizes()),
           shape_str(v.sizes()));
  FG_CHECK(k.size(0) == k_.size(0) && k.size(1) == k_.size(1) && k.size(3) == k_.size(3), ShapeError,
           "KVCache.append: k {} does not match the cache [{}, {}, *, {}]", shape_str(k.sizes()), k_.size(0),
           k_.size(1), k_.size(3));
  const int64_t n = k.size(2);
  FG_CHECK(len_ + n <= capacity(), IndexError, "KVCache.append: {} cached + {} new tokens exceed capacity {}", len_, n,
           capacity());
  {
    // The cache is inference state: it stores values, never history.
    NoGradGuard ng;
    Tensor kd = narrow(k_, 2, len_, n), vd = narrow(v_, 2, len_, n);
    kd.copy_(k.detach());
    vd.copy_(v.detach());
  }
  len_ += n;
  return {narrow(k_, 2, 0, len_), narrow(v_, 2, 0, len_)};
}

KVCacheFactory contiguous_kv_cache_factory() {
  return [](int64_t, int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, TensorOptions opt) {
    return std::make_unique<ContiguousKVCache>(batch, kv_heads, max_len, head_dim, opt);
  };
}

}  // namespace fg::nn
