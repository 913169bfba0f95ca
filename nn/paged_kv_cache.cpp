#include "flexgrad/nn/paged_kv_cache.h"

#include <algorithm>
#include <vector>

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/index.h"
#include "flexgrad/ops/view.h"

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

// A BlockMask's lists moved to `dev` (the mask is otherwise the same).
BlockMask mask_on(const BlockMask& bm, Device dev) {
  auto to = [&](const Tensor& t) { return t.defined() ? t.to(dev) : t; };
  return BlockMask::from_kv_blocks(to(bm.kv_num_blocks()), to(bm.kv_indices()), to(bm.full_kv_num_blocks()),
                                   to(bm.full_kv_indices()), bm.block_size(), bm.mask_mod(), bm.seq_lengths());
}

}  // namespace

PagedKVCache::PagedKVCache(int64_t batch, int64_t kv_heads, int64_t max_len, int64_t head_dim, int64_t page_size,
                           int64_t n_pages, TensorOptions options)
    : batch_(batch),
      kv_heads_(kv_heads),
      max_len_(max_len),
      head_dim_(head_dim),
      pa_(checked_pages(batch, kv_heads, max_len, head_dim, page_size, n_pages), page_size, batch, options.device_),
      lens_(static_cast<size_t>(batch), 0) {
  const Shape pool{1, kv_heads, pa_.max_cached_seq_len(), head_dim};
  k_pool_ = zeros(pool, options.requires_grad(false));
  v_pool_ = zeros(pool, options.requires_grad(false));
}

void PagedKVCache::check_row(int64_t b, const char* op) const {
  FG_CHECK(b >= 0 && b < batch_, IndexError, "PagedKVCache.{}: row {} out of range [0, {}) (batch)", op, b, batch_);
}

int64_t PagedKVCache::length(int64_t b) const {
  check_row(b, "length");
  return lens_[static_cast<size_t>(b)];
}

int64_t PagedKVCache::max_len_seen() const { return *std::max_element(lens_.begin(), lens_.end()); }

void PagedKVCache::append(const Tensor& k, const Tensor& v) {
  check_kv_append("PagedKVCache", k, v, batch_, kv_heads_, head_dim_);
  append(k, v, std::vector<int64_t>(static_cast<size_t>(batch_), k.size(2)));
}

void PagedKVCache::append(const Tensor& k, const Tensor& v, const std::vector<int64_t>& new_tokens) {
  check_kv_append("PagedKVCache", k, v, batch_, kv_heads_, head_dim_);
  const Device dev = device();
  FG_CHECK(k.device() == dev && v.device() == dev, DeviceError,
           "PagedKVCache.append: k and v must be on the cache's device {}, got {} and {}", dev, k.device(), v.device());
  const int64_t n = k.size(2);
  FG_CHECK(static_cast<int64_t>(new_tokens.size()) == batch_, ShapeError,
           "PagedKVCache.append: new_tokens has {} entries, expected one per row ({})", new_tokens.size(), batch_);
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t nt = new_tokens[static_cast<size_t>(b)];
    FG_CHECK(nt >= 0 && nt <= n, ValueError,
             "PagedKVCache.append: new_tokens[{}] = {} is outside [0, {}] (the {} tokens given in k, v {})", b, nt, n,
             n, shape_str(k.sizes()));
    FG_CHECK(lens_[static_cast<size_t>(b)] + nt <= max_len_, IndexError,
             "PagedKVCache.append: row {}: {} cached + {} new tokens exceed capacity {}", b,
             lens_[static_cast<size_t>(b)], nt, max_len_);
  }
  // Pages the rows need for their new lengths, checked against the pool before any is taken.
  const int64_t ps = pa_.page_size();
  int64_t need = 0, total = 0, before = 0, after = 0;
  for (int64_t b = 0; b < batch_; ++b) {
    const int64_t len = lens_[static_cast<size_t>(b)], nt = new_tokens[static_cast<size_t>(b)];
    need += std::max<int64_t>(0, cdiv(len + nt, ps) - pa_.capacity(b) / ps);
    total += nt;
    before = std::max(before, len);
    after = std::max(after, len + nt);
  }
  if (total == 0) return;
  const int64_t free_pages = static_cast<int64_t>(pa_.empty_pages().size());
  FG_CHECK(need <= free_pages, ValueError,
           "PagedKVCache.append: page pool exhausted: {} rows growing by {} tokens in all (the longest from {} to {} "
           "tokens) need {} more page(s) of {} tokens, but only {} of {} pages are free (give the cache more pages, "
           "reset it, or reset_row the finished rows)",
           batch_, total, before, after, need, ps, free_pages, pa_.n_pages());
  for (int64_t b = 0; b < batch_; ++b) pa_.reserve(b, lens_[static_cast<size_t>(b)] + new_tokens[static_cast<size_t>(b)]);
  {
    // The cache is inference state: it stores values, never history (in the pools' dtype, as the contiguous
    // cache's copy_ converts).
    NoGradGuard ng;
    Tensor kd = k.detach().to(k_pool_.dtype()), vd = v.detach().to(v_pool_.dtype());
    // The slots and positions go to assign as host tensors: the decode loop knows them, no device read.
    std::vector<int64_t> slot_v, pos_v;
    if (total == batch_ * n) {
      // Every row keeps every token: one [batch, n] write.
      for (int64_t b = 0; b < batch_; ++b) {
        slot_v.push_back(b);
        for (int64_t s = 0; s < n; ++s) pos_v.push_back(lens_[static_cast<size_t>(b)] + s);
      }
      pa_.assign(from_vector(slot_v, {batch_}, kInt64), from_vector(pos_v, {batch_, n}, kInt64), kd, vd, k_pool_,
                 v_pool_);
    } else {
      // Ragged: the kept tokens as `total` one-token entries [total, Hkv, 1, E], each with its row and position.
      std::vector<int64_t> keep;
      for (int64_t b = 0; b < batch_; ++b)
        for (int64_t s = 0; s < new_tokens[static_cast<size_t>(b)]; ++s) {
          keep.push_back(b * n + s);
          slot_v.push_back(b);
          pos_v.push_back(lens_[static_cast<size_t>(b)] + s);
        }
      Tensor keep_t = to_device(from_vector(keep, {total}, kInt64), dev, /*non_blocking=*/true);
      auto kept = [&](const Tensor& t) {
        Tensor rows = reshape(permute(t, {0, 2, 1, 3}), {batch_ * n, kv_heads_, head_dim_});
        return unsqueeze(index_select(rows, 0, keep_t), 2).contiguous();
      };
      pa_.assign(from_vector(slot_v, {total}, kInt64), from_vector(pos_v, {total, 1}, kInt64), kept(kd), kept(vd),
                 k_pool_, v_pool_);
    }
  }
  for (int64_t b = 0; b < batch_; ++b) lens_[static_cast<size_t>(b)] += new_tokens[static_cast<size_t>(b)];
}

FlexAttentionResult PagedKVCache::attend(const Tensor& q, const FlexAttentionOptions& opts) const {
  const int64_t len = max_len_seen();
  check_kv_query("PagedKVCache", q, batch_, head_dim_, len);
  const Device dev = device();
  FG_CHECK(q.device() == dev, DeviceError, "PagedKVCache.attend: q is on {} but the cache on {}", q.device(), dev);
  const int64_t Lq = q.size(2), ps = pa_.page_size();
  BlockMask logical;
  if (opts.block_mask) {
    const BlockMask& bm = *opts.block_mask;
    FG_CHECK(bm.seq_lengths().first == Lq && bm.seq_lengths().second == len, ShapeError,
             "PagedKVCache.attend: the BlockMask was created for (Q_LEN, KV_LEN) = ({}, {}) but the call has {} "
             "queries over {} cached tokens (the longest row)",
             bm.seq_lengths().first, bm.seq_lengths().second, Lq, len);
    FG_CHECK(bm.batch() == 1 || bm.batch() == batch_, ShapeError,
             "PagedKVCache.attend: the BlockMask has batch size {} but the cache has {} rows (expected 1 or equal)",
             bm.batch(), batch_);
    // The physical mask's kv blocks are pages: rebuild a mask of other kv blocks from its mask_mod.
    if (bm.block_size().kv != ps)
      logical = create_block_mask(bm.mask_mod(), bm.batch(), bm.heads(), Lq, len, BlockSize(bm.block_size().q, ps), dev);
    else
      logical = bm.device() == dev ? bm : mask_on(bm, dev);
  } else {
    // Every cached token: all kv blocks full (convert cuts each row at its length). Built on the host, where
    // from_kv_blocks checks it without a device read-back; convert uploads its lists without waiting.
    const int64_t bq = std::min<int64_t>(Lq, 128), nq = cdiv(Lq, bq), nkv = cdiv(len, ps);
    std::vector<int32_t> idx(static_cast<size_t>(nq * nkv));
    for (int64_t r = 0; r < nq; ++r)
      for (int64_t j = 0; j < nkv; ++j) idx[static_cast<size_t>(r * nkv + j)] = static_cast<int32_t>(j);
    Tensor full_idx = from_vector(idx, {1, 1, nq, nkv}, kInt32);
    logical = BlockMask::from_kv_blocks(zeros({1, 1, nq}, kInt32), full_idx, full({1, 1, nq}, static_cast<int32_t>(nkv), kInt32),
                                        full_idx, BlockSize(bq, ps), noop_mask, std::make_pair(Lq, len));
  }
  // Slots and lengths go to convert as host tensors (checked there without a device read-back); row b is
  // slot b, so the score_mod needs no batch_idx and every page-table read it makes is provably in range (no
  // error flag, no synchronisation per step).
  Tensor host_len = from_vector(lens_, {batch_}, kInt64);
  Tensor host_slots = arange(static_cast<double>(batch_), kInt64);
  FlexAttentionOptions po = opts;
  po.block_mask = pa_.convert_logical_block_mask(logical, host_slots, host_len);
  if (opts.score_mod) po.score_mod = pa_.get_score_mod(opts.score_mod, to_device(host_len, dev, /*non_blocking=*/true));
  return flex_attention(contiguous(q), k_pool_, v_pool_, po);
}

void PagedKVCache::reset() {
  for (int64_t b = 0; b < batch_; ++b) pa_.erase(b);
  std::fill(lens_.begin(), lens_.end(), 0);
}

void PagedKVCache::reset_row(int64_t b) {
  check_row(b, "reset_row");
  pa_.erase(b);
  lens_[static_cast<size_t>(b)] = 0;
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
