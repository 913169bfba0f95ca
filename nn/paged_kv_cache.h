// PagedKVCache: a KVCache whose keys/values live in a pool of fixed-size pages (PagedAttention), attended
// straight from the pool: no contiguous copy of the past is made on any step.
//
// Each batch row is one PagedAttention slot. append() reserves pages as the rows grow and writes the new
// rows at their physical places (PagedAttention::assign); attend() turns the logical BlockMask into one
// over the physical pool (convert_logical_block_mask, kv block size = page_size), wraps the score_mod
// (get_score_mod) so the mods see logical kv indices, and runs flex_attention(q, k_pool, v_pool) with the
// pool broadcast over the batch and GQA as the caller asks. The result equals the contiguous cache's.
//
// Pools: k_pool / v_pool [1, Hkv, n_pages * page_size, E] of the cache's dtype, CPU only (PagedAttention's
// tables are read by the mods on the CPU). reset() erases every slot: all pages go back to the pool.
#pragma once
#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/nn/kv_cache.h"

namespace fg::nn {

class PagedKVCache : public KVCache {
 public:
  // `batch` slots of up to max_len tokens each, in a pool of n_pages pages of page_size tokens. n_pages 0
  // picks batch * ceil(max_len / page_size): room for every row at full length (fewer pages save memory
  // when sequences stay short; append then fails once the pool runs dry).
  // ValueError for non-positive sizes or negative n_pages; NotImplementedError for a non-CPU device.
  PagedKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t page_size,
               int64_t n_pages = 0, TensorOptions options = {});

  // ShapeError for k/v not [batch, kv_heads, L, head_dim]; IndexError past max_len; ValueError when the
  // pool has too few free pages (nothing is changed then).
  void append(const Tensor& k, const Tensor& v) override;
  // ShapeError / ValueError for a q or block_mask that does not fit (see KVCache::attend). A block_mask
  // whose kv block size differs from page_size is rebuilt from its mask_mod with kv blocks of page_size.
  FlexAttentionResult attend(const Tensor& q, const FlexAttentionOptions& opts) const override;
  int64_t length() const override { return len_; }
  int64_t capacity() const override { return max_len_; }
  void reset() override;

  const PagedAttention& paged() const { return pa_; }
  const Tensor& k_pool() const { return k_pool_; }
  const Tensor& v_pool() const { return v_pool_; }
  int64_t batch() const { return batch_; }
  int64_t page_size() const { return pa_.page_size(); }
  int64_t n_pages() const { return pa_.n_pages(); }
  int64_t pages_in_use() const { return pa_.pages_in_use(); }

 private:
  int64_t batch_, kv_heads_, max_len_, head_dim_;
  PagedAttention pa_;
  Tensor k_pool_, v_pool_;
  Tensor slots_;  // arange(batch) int64: batch row b is slot b
  int64_t len_ = 0;
};

// Makes PagedKVCaches (one pool per layer) of page_size-token pages; n_pages 0: enough for every row at the
// model's full context (see PagedKVCache).
KVCacheFactory paged_kv_cache_factory(int64_t page_size, int64_t n_pages = 0);

}  // namespace fg::nn
