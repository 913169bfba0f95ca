// Key/value caches for autoregressive generation. FlexMultiheadAttention talks to the abstract KVCache
// only: it appends the new tokens' keys/values and then lets the cache run the attention itself, so a
// cache whose storage is not one contiguous [B, Hkv, L, E] tensor (PagedKVCache: fixed-size pages plus a
// page table, nn/paged_kv_cache.h) attends straight from its own layout without gathering it.
#pragma once
#include <functional>
#include <memory>
#include <utility>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/tensor/tensor.h"

namespace fg::nn {

class KVCache {
 public:
  virtual ~KVCache() = default;
  // Stores k, v [B, Hkv, Lnew, E] at positions [length(), length() + Lnew) of every batch row. The cache
  // keeps values only (no autograd history). A cache whose rows may hold different numbers of tokens
  // (PagedKVCache::append with new_tokens) stores them after each row's own tokens.
  virtual void append(const Tensor& k, const Tensor& v) = 0;
  // flex_attention of q [B, Hq, Lq, E] — the queries of the last Lq appended tokens — over all length()
  // cached keys/values, as flex_attention(q, k_all, v_all, opts) with k_all, v_all [B, Hkv, length(), E].
  // opts.block_mask and opts.score_mod see logical indices: q_idx in [0, Lq), kv_idx in [0, length()).
  virtual FlexAttentionResult attend(const Tensor& q, const FlexAttentionOptions& opts) const = 0;
  virtual int64_t length() const = 0;    // tokens cached per batch row (the longest row's where rows differ)
  virtual int64_t capacity() const = 0;  // tokens it can hold (per batch row)
  virtual void reset() = 0;              // forget everything
};

// One preallocated [B, Hkv, max_len, E] buffer for keys and one for values; append copies the new
// tokens in, attend runs flex_attention over the filled prefix.
class ContiguousKVCache : public KVCache {
 public:
  ContiguousKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, TensorOptions options = {});
  void append(const Tensor& k, const Tensor& v) override;
  FlexAttentionResult attend(const Tensor& q, const FlexAttentionOptions& opts) const override;
  int64_t length() const override { return len_; }
  int64_t capacity() const override { return k_.size(2); }
  void reset() override { len_ = 0; }  // keeps the memory
  // Views of the cached prefix, [B, Hkv, length(), E] (no copy).
  Tensor keys() const;
  Tensor values() const;

 private:
  Tensor k_, v_;
  int64_t len_ = 0;
};

// Makes the cache of one layer; what a model's generate() asks for, so callers choose the kind.
using KVCacheFactory = std::function<std::unique_ptr<KVCache>(int64_t layer, int64_t batch, int64_t kv_heads,
                                                              int64_t max_len, int64_t head_dim, TensorOptions)>;
KVCacheFactory contiguous_kv_cache_factory();

// Shared by the caches: k, v [B, Hkv, L, E] of one shape matching (batch, kv_heads, head_dim); q
// [B, Hq, Lq, E] with 1 <= Lq <= length. `who` names the caller in the messages.
void check_kv_append(const char* who, const Tensor& k, const Tensor& v, int64_t batch, int64_t kv_heads,
                     int64_t head_dim);
void check_kv_query(const char* who, const Tensor& q, int64_t batch, int64_t head_dim, int64_t length);

}  // namespace fg::nn
