#include "flexgrad/nn/paged_kv_cache.h"

#include <algorithm>
#include <vector>

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"

namespace fg::nn {

namespace {

// Overflow-free for any a >= 0.
int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

int64_t checked_pages(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t page_size,
                      int64_t n_pages) {
  FG_CHECK(batch > 0 && kv_heads > 0 && max_len > 0 && head_dim > 0 && page_size > 0, ValueError,
           "PagedKVCache: sizes must be positive, got batch {}, kv_heads {}, max_len {}, head_dim {}, page_size {}",
           batch, kv_heads, max_len, head_dim, page_size);
  FG_CHECK(n_pages >= 0, ValueError, "PagedKVCache: n_pages must be >= 0 (0: automatic), got {}", n_pages);
  if (n_pages > 0) return n_pages;
  int64_t pages = 0;
  FG_CHECK(!__builtin_mul_overflow(batch, cdiv(max_len, page_size), &pages), ValueError,
           "PagedKVCache: batch {} x max_len {} tokens is too many pages of {} to count in int64", batch, max_len,
           page_size);
  return pages;
}

}  // namespace

PagedKVCache::PagedKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t page_size,
                           int64_t n_pages, TensorOptions options)
    : batch_(batch),
      kv_heads_(kv_heads),
      max_len_(max_len),
      head_dim_(head_dim),
      pa_(checked_pages(batch, kv_heads, max_len, head_dim, page_size, n_pages), page_size, batch, options.device_) {
  const Shape pool{1, kv_heads, pa_.max_cached_seq_len(), head_dim};
  k_pool_ = zeros(pool, options.requires_grad(false));
  v_pool_ = zeros(pool, options.requires_grad(false));
  slots_ = arange(static_cast<double>(batch), kInt64);
}

void PagedKVCache::append(const Tensor& k, const Tensor& v) {
  check_kv_append("PagedKVCache", k, v, batch_, kv_heads_, head_dim_);
  const int64_t n = k.size(2);
  FG_CHECK(len_ + n <= max_len_, IndexError, "PagedKVCache.append: {} cached + {} new tokens exceed capacity {}",
           len_, n, max_len_);
  if (n == 0) return;
  // Pages every row needs for len_ + n tokens, checked against the pool before any is taken.
  const int64_t ps = pa_.page_size(), rows_pages = cdiv(len_ + n, ps);
  int64_t need = 0;
  for (int64_t b = 0; b < batch_; ++b) need += std::max<int64_t>(0, rows_pages - pa_.capacity(b) / ps);
  const int64_t free_pages = static_cast<int64_t>(pa_.empty_pages().size());
  FG_CHECK(need <= free_pages, ValueError,
           "PagedKVCache.append: page pool exhausted: {} rows growing from {} to {} tokens need {} more page(s) of {} "
           "tokens, but only {} of {} pages are free (give the cache more pages, or reset it)",
           batch_, len_, len_ + n, need, ps, free_pages, pa_.n_pages());
  for (int64_t b = 0; b < batch_; ++b) pa_.reserve(b, len_ + n);
  // Logical positions len_ .. len_+n-1 of every row.
  std::vector<int64_t> pos_v(static_cast<size_t>(batch_ * n));
  for (int64_t b = 0; b < batch_; ++b)
    for (int64_t s = 0; s < n; ++s) pos_v[static_cast<size_t>(b * n + s)] = len_ + s;
  Tensor pos = from_vector(pos_v, {batch_, n}, kInt64);
  {
    // The cache is inference state: it stores values, never history.
    NoGradGuard ng;
    pa_.assign(slots_, pos, k.detach(), v.detach(), k_pool_, v_pool_);
  }
  len_ += n;
}

FlexAttentionResult PagedKVCache::attend(const Tensor& q, const FlexAttentionOptions& opts) const {
  check_kv_query("PagedKVCache", q, batch_, head_dim_, len_);
  const int64_t Lq = q.size(2), ps = pa_.page_size();
  BlockMask logical;
  if (opts.block_mask) {
    const BlockMask& bm = *opts.block_mask;
    FG_CHECK(bm.seq_lengths().first == Lq && bm.seq_lengths().second == len_, ShapeError,
             "PagedKVCache.attend: the BlockMask was created for (Q_LEN, KV_LEN) = ({}, {}) but the call has {} "
             "queries over {} cached tokens",
             bm.seq_lengths().first, bm.seq_lengths().second, Lq, len_);
    FG_CHECK(bm.batch() == 1 || bm.batch() == batch_, ShapeError,
             "PagedKVCache.attend: the BlockMask has batch size {} but the cache has {} rows (expected 1 or equal)",
             bm.batch(), batch_);
    // The physical mask's kv blocks are pages: rebuild a mask of other kv blocks from its mask_mod.
    logical = bm.block_size().kv == ps
                  ? bm
                  : create_block_mask(bm.mask_mod(), bm.batch(), bm.heads(), Lq, len_, BlockSize(bm.block_size().q, ps));
  } else {
    // Every cached token: all kv blocks full (convert cuts the last one at len_).
    const int64_t bq = std::min<int64_t>(Lq, 128), nq = cdiv(Lq, bq), nkv = cdiv(len_, ps);
    std::vector<int32_t> idx(static_cast<size_t>(nq * nkv));
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t j = 0; j < nkv; ++j) idx[static_cast<size_t>(r * nkv + j)] = static_cast<int32_t>(j);
    Tensor full_idx = from_vector(idx, {1, 1, nq, nkv}, kInt32);
    logical = BlockMask::from_kv_blocks(zeros({1, 1, nq}, kInt32), full_idx,
                                        full({1, 1, nq}, static_cast<int32_t>(nkv), kInt32), full_idx,
                                        BlockSize(bq, ps), noop_mask, std::make_pair(Lq, len_));
  }
  Tensor kv_len = full({batch_}, static_cast<double>(len_), kInt64);
  FlexAttentionOptions po = opts;
  po.block_mask = pa_.convert_logical_block_mask(logical, slots_, kv_len);
  if (opts.score_mod) po.score_mod = pa_.get_score_mod(opts.score_mod, kv_len, slots_);
  return flex_attention(contiguous(q), k_pool_, v_pool_, po);
}

void PagedKVCache::reset() {
  for (int64_t b = 0; b < batch_; ++b) pa_.erase(b);
  len_ = 0;
}

KVCacheFactory paged_kv_cache_factory(int64_t page_size, int64_t n_pages) {
  FG_CHECK(page_size > 0 && n_pages >= 0, ValueError,
           "paged_kv_cache_factory: page_size must be positive and n_pages >= 0 (0: automatic), got {} and {}",
           page_size, n_pages);
  return [page_size, n_pages](int64_t, int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim,
                              TensorOptions opt) {
    return std::make_unique<PagedKVCache>(batch, kv_heads, max_len, head_dim, page_size, n_pages, opt);
  };
}

}  // namespace fg::nn
