// Key/value caches for autoregressive generation. FlexMultiheadAttention talks to the abstract KVCache
// only, so a paged implementation (PagedAttention: fixed-size pages plus a page table) can replace the
// contiguous one without touching the layer.
#pragma once
#include <functional>
#include <memory>
#include <utility>

#include "tensor/tensor.h"

namespace fg::nn {

class KVCache {
 public:
  virtual ~KVCache() = default;
  // Appends k, v [B, Hkv, Lnew, E] at positions [length(), length() + Lnew) and returns all keys and
  // values so far, [B, Hkv, length(), E] each (after the append).
  virtual std::pair<Tensor, Tensor> append(const Tensor& k, const Tensor& v) = 0;
  virtual int64_t length() const = 0;    // tokens cached
  virtual int64_t capacity() const = 0;  // tokens it can hold
  virtual void reset() = 0;              // forget everything (keeps the memory)
};

// One preallocated [B, Hkv, max_len, E] buffer for keys and one for values; append copies the new
// tokens in and returns views of the filled prefix (no copy of the past).
class ContiguousKVCache : public KVCache {
 public:
  ContiguousKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, TensorOptions options = {});
  std::pair<Tensor, Tensor> append(const Tensor& k, const Tensor& v) override;
  int64_t length() const override { return len_; }
  int64_t capacity() const override { return k_.size(2); }
  void reset() override { len_ = 0; }

 private:
  Tensor k_, v_;
  int64_t len_ = 0;
};

// Makes the cache of one layer; what a model's generate() asks for, so callers choose the kind.
using KVCacheFactory = std::function<std::unique_ptr<KVCache>(int64_t layer, int64_t batch, int64_t kv_heads,
                                                              int64_t max_len, int64_t head_dim, TensorOptions)>;
KVCacheFactory contiguous_kv_cache_factory();

}  // namespace fg::nn
