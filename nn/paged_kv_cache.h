// PagedKVCache: a KVCache whose keys/values live in a pool of fixed-size pages (PagedAttention), attended
// straight from the pool: no contiguous copy of the past is made on any step.
//
// Each batch row is one PagedAttention slot and holds its own number of tokens, length(b): rows may differ
// (ragged prefill, continuous batching). append() reserves pages as the rows grow and writes the new rows
// at their physical places (PagedAttention::assign); attend() turns the logical BlockMask into one over the
// physical pool (convert_logical_block_mask, kv block size = page_size, each row cut at its own length
// through kv_len), wraps the score_mod (get_score_mod) so the mods see logical kv indices, and runs
// flex_attention(q, k_pool, v_pool) with the pool broadcast over the batch and GQA as the caller asks. With
// equal rows the result equals the contiguous cache's; with ragged rows, row b's equals flex_attention over
// that row's first length(b) keys/values alone.
//
// Pools: k_pool / v_pool [1, Hkv, n_pages * page_size, E] of the cache's dtype on the cache's device (CPU or
// CUDA); the page tables, the converted masks and the index tensors the mods capture live there too (on
// CUDA, PagedAttention keeps a host copy of the tables in step, so the bookkeeping needs no device read).
// reset() erases every slot: all pages go back to the pool; reset_row(b) erases one.
#pragma once
#include <vector>

#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/nn/kv_cache.h"

namespace fg::nn {

class PagedKVCache : public KVCache {
 public:
  // `batch` slots of up to max_len tokens each, in a pool of n_pages pages of page_size tokens. n_pages 0
  // picks batch * ceil(max_len / page_size): room for every row at full length (fewer pages save memory
  // when sequences stay short; append then fails once the pool runs dry). options: dtype and device of the
  // pools (requires_grad is ignored: the cache holds values only).
  // ValueError for non-positive sizes or negative n_pages.
  PagedKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t page_size,
               int64_t n_pages = 0, TensorOptions options = {});

  // k, v [batch, kv_heads, Lnew, head_dim] on the cache's device (stored in the pools' dtype, converted as
  // the contiguous cache's copy converts): every row keeps all Lnew tokens, each after its own length(b)
  // tokens (append(k, v, {Lnew, ..., Lnew})).
  void append(const Tensor& k, const Tensor& v) override;
  // Row b keeps the first new_tokens[b] of the Lnew given tokens (0 <= new_tokens[b] <= Lnew), written at
  // positions [length(b), length(b) + new_tokens[b]); the rest of row b's k/v is ignored (padding).
  // Everything is checked before anything changes: ShapeError for k/v not [batch, kv_heads, Lnew, head_dim]
  // or new_tokens without one entry per row; DeviceError for k/v not on the cache's device; ValueError for
  // new_tokens[b] outside [0, Lnew] or when the pool has too few free pages; IndexError when a row would
  // pass max_len.
  void append(const Tensor& k, const Tensor& v, const std::vector<int64_t>& new_tokens);

  // q [batch, Hq, Lq, E] (1 <= Lq <= length()): row b attends to its own length(b) cached tokens. The
  // block_mask and score_mod see logical indices, q_idx in [0, Lq) and kv_idx in [0, length(b)); a given
  // block_mask is made for (Lq, length()) — the longest row — with batch 1 or `batch`, and each row is cut
  // at its own length. A row holding no tokens attends to nothing (zeros, as flex_attention for a fully
  // masked row). A block_mask whose kv block size differs from page_size is rebuilt from its mask_mod with kv
  // blocks of page_size on the cache's device; one on another device is moved there. ShapeError / ValueError
  // for a q or block_mask that does not fit (see KVCache::attend), DeviceError for q on another device.
  FlexAttentionResult attend(const Tensor& q, const FlexAttentionOptions& opts) const override;

  // The longest row's length: what the uniform KVCache interface reads (equal to every row's while rows
  // are only appended to uniformly; the logical KV_LEN of attend's block_mask).
  int64_t length() const override { return max_len_seen(); }
  // Tokens cached in row b. IndexError for a bad row.
  int64_t length(int64_t b) const;
  const std::vector<int64_t>& lengths() const { return lens_; }
  int64_t capacity() const override { return max_len_; }  // per row
  void reset() override;
  // Row b forgets its tokens and gives its pages back to the pool, so a new sequence can start there
  // (continuous batching); the other rows are untouched. IndexError for a bad row.
  void reset_row(int64_t b);

  const PagedAttention& paged() const { return pa_; }
  const Tensor& k_pool() const { return k_pool_; }
  const Tensor& v_pool() const { return v_pool_; }
  int64_t batch() const { return batch_; }
  Device device() const { return k_pool_.device(); }
  int64_t page_size() const { return pa_.page_size(); }
  int64_t n_pages() const { return pa_.n_pages(); }
  int64_t pages_in_use() const { return pa_.pages_in_use(); }

 private:
  int64_t max_len_seen() const;
  void check_row(int64_t b, const char* op) const;

  int64_t batch_, kv_heads_, max_len_, head_dim_;
  PagedAttention pa_;
  Tensor k_pool_, v_pool_;
  std::vector<int64_t> lens_;  // tokens of each row
};

// Makes PagedKVCaches (one pool per layer) of page_size-token pages; n_pages 0: enough for every row at the
// model's full context (see PagedKVCache).
KVCacheFactory paged_kv_cache_factory(int64_t page_size, int64_t n_pages = 0);

}  // namespace fg::nn
