#include "flexgrad/nn/kv_cache.h"

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/view.h"

namespace fg::nn {

void check_kv_append(const char* who, const Tensor& k, const Tensor& v, int64_t batch, int64_t kv_heads,
                     int64_t head_dim) {
  FG_CHECK(k.defined() && v.defined(), ValueError, "{}.append: k and v must be defined", who);
  FG_CHECK(k.dim() == 4 && k.sizes() == v.sizes(), ShapeError,
           "{}.append: k and v must be [B, Hkv, L, E] of one shape, got {} and {}", who, shape_str(k.sizes()),
           shape_str(v.sizes()));
  FG_CHECK(k.size(0) == batch && k.size(1) == kv_heads && k.size(3) == head_dim, ShapeError,
           "{}.append: k {} does not match the cache [{}, {}, *, {}]", who, shape_str(k.sizes()), batch, kv_heads,
           head_dim);
}

void check_kv_query(const char* who, const Tensor& q, int64_t batch, int64_t head_dim, int64_t length) {
  FG_CHECK(q.defined() && q.dim() == 4, ShapeError, "{}.attend: q must be [B, Hq, Lq, E], got {}", who,
           q.defined() ? shape_str(q.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(q.size(0) == batch && q.size(3) == head_dim, ShapeError,
           "{}.attend: q {} does not match the cache (batch {}, head_dim {})", who, shape_str(q.sizes()), batch,
           head_dim);
  FG_CHECK(q.size(2) >= 1 && q.size(2) <= length, ValueError,
           "{}.attend: q has {} queries but {} tokens are cached (the queries are those of the last appended "
           "tokens: append first)",
           who, q.size(2), length);
}

ContiguousKVCache::ContiguousKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim,
                                     TensorOptions options) {
  FG_CHECK(batch > 0 && kv_heads > 0 && max_len > 0 && head_dim > 0, ValueError,
           "ContiguousKVCache: sizes must be positive, got batch {}, kv_heads {}, max_len {}, head_dim {}", batch,
           kv_heads, max_len, head_dim);
  k_ = zeros({batch, kv_heads, max_len, head_dim}, options.requires_grad(false));
  v_ = zeros({batch, kv_heads, max_len, head_dim}, options.requires_grad(false));
}

void ContiguousKVCache::append(const Tensor& k, const Tensor& v) {
  check_kv_append("KVCache", k, v, k_.size(0), k_.size(1), k_.size(3));
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
}

Tensor ContiguousKVCache::keys() const { return narrow(k_, 2, 0, len_); }
Tensor ContiguousKVCache::values() const { return narrow(v_, 2, 0, len_); }

FlexAttentionResult ContiguousKVCache::attend(const Tensor& q, const FlexAttentionOptions& opts) const {
  check_kv_query("KVCache", q, k_.size(0), k_.size(3), len_);
  return flex_attention(contiguous(q), contiguous(keys()), contiguous(values()), opts);
}

KVCacheFactory contiguous_kv_cache_factory() {
  return [](int64_t, int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, TensorOptions opt) {
    return std::make_unique<ContiguousKVCache>(batch, kv_heads, max_len, head_dim, opt);
  };
}

}  // namespace fg::nn
