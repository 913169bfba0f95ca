#include "flexgrad/attention/paged_attention.h"

#include <algorithm>
#include <cstring>
#include <limits>

#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/attention/paged_attention_kernels.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/error.h"

namespace fg {

FG_DEFINE_STUB(PagedScatterFn, paged_scatter_stub);
FG_DEFINE_STUB(PagedConvertFn, paged_convert_stub);

namespace {

// Overflow-free for any a >= 0 (seq_len may be as large as INT64_MAX).
int64_t cdiv(int64_t a, int64_t b) { return a / b + (a % b != 0); }

// An integer tensor of `rank` dims as int64 values (validated: defined, integral).
std::vector<int64_t> int_values(const Tensor& t, const char* op, const char* name, int64_t rank) {
  FG_CHECK(t.defined(), ValueError, "PagedAttention.{}: {} is undefined", op, name);
  FG_CHECK(is_integral(t.dtype()), DTypeError, "PagedAttention.{}: {} must be an integer tensor, got {}", op, name,
           t.dtype());
  FG_CHECK(t.dim() == rank, ShapeError, "PagedAttention.{}: {} must have {} dim(s), got shape {}", op, name, rank,
           shape_str(t.sizes()));
  std::vector<double> v = (t.is_cpu() ? t : t.to(kCPU)).to_vector();  // one copy back from a device
  return std::vector<int64_t>(v.begin(), v.end());
}

// An int32/int64 tensor on `dev` a mod can capture (a converted copy otherwise).
Tensor capturable_index(const Tensor& t, Device dev, const char* op, const char* name) {
  FG_CHECK(is_integral(t.dtype()), DTypeError, "PagedAttention.{}: {} must be an integer tensor, got {}", op, name,
           t.dtype());
  FG_CHECK(t.dim() == 1, ShapeError, "PagedAttention.{}: {} must be 1-D, got shape {}", op, name, shape_str(t.sizes()));
  if (t.device() == dev && (t.dtype() == kInt32 || t.dtype() == kInt64)) return t;
  return t.to(dev, kInt64);
}

Expr identity_score(Expr s, Expr, Expr, Expr, Expr) { return s; }

// The logical kv index of a physical one for query batch b (0 where invalid), and whether it is valid:
// the page is owned by b's slot and the logical index is below kv_len[b]. Captures the tables by value
// (shared storage), so mods stay valid when the PagedAttention object moves. `max_batch` > 0 says that
// batch_idx is a private copy whose values were checked to lie in [0, max_batch): the slot is then clamped
// to that range, which changes nothing but lets a CUDA launch prove the page-table read in range
// (attention/int_ranges.h), so the kernel needs no error flag and the call no synchronising read-back.
Expr logical_kv(const Tensor& p2l, int64_t ps, const Expr& b, const Expr& physical_kv, const Tensor& batch_idx,
                const Tensor& kv_len, int64_t max_batch, Expr* valid) {
  Expr slot = batch_idx.defined() ? Expr(Captured(batch_idx, "paged_batch_idx")[b]) : b;
  if (batch_idx.defined() && max_batch > 0) slot = clamp(slot, 0, max_batch - 1);
  Expr logical_block = Captured(p2l, "physical_to_logical")({slot, floor_div(physical_kv, ps)});
  Expr lkv = logical_block * ps + physical_kv % ps;
  Expr ok = logical_block >= 0;
  if (kv_len.defined()) ok = ok & (lkv < Expr(Captured(kv_len, "paged_kv_len")[b]));
  *valid = ok;
  return where(ok, lkv, 0);
}

MaskMod paged_mask_mod(const Tensor& p2l, int64_t ps, MaskMod mask_mod, const Tensor& len, const Tensor& slots,
                       int64_t max_batch) {
  if (!mask_mod) mask_mod = noop_mask;
  return [p2l, ps, mask_mod, len, slots, max_batch](Expr b, Expr h, Expr q, Expr kv) {
    Expr valid(false);
    Expr lkv = logical_kv(p2l, ps, b, kv, slots, len, max_batch, &valid);
    return valid & mask_mod(b, h, q, lkv);
  };
}

}  // namespace

PagedAttention::PagedAttention(int64_t n_pages, int64_t page_size, int64_t max_batch_size, Device device)
    : n_pages_(n_pages), page_size_(page_size), max_batch_(max_batch_size), device_(device) {
  FG_CHECK(n_pages > 0 && page_size > 0 && max_batch_size > 0, ValueError,
           "PagedAttention: n_pages, page_size and max_batch_size must be positive, got {}, {} and {}", n_pages,
           page_size, max_batch_size);
  host_page_table_ = full({max_batch_size, n_pages}, -1, kInt64);
  host_physical_to_logical_ = full({max_batch_size, n_pages}, -1, kInt64);
  host_capacity_ = zeros({max_batch_size}, kInt64);
  if (device.is_cpu()) {
    page_table_ = host_page_table_;
    physical_to_logical_ = host_physical_to_logical_;
    capacity_ = host_capacity_;
  } else {
    page_table_ = host_page_table_.to(device);
    physical_to_logical_ = host_physical_to_logical_.to(device);
    capacity_ = host_capacity_.to(device);
  }
  empty_pages_.reserve(static_cast<size_t>(n_pages));
  for (int64_t p = n_pages - 1; p >= 0; --p) empty_pages_.push_back(p);
}

void PagedAttention::check_slot(int64_t batch_idx, const char* op) const {
  FG_CHECK(batch_idx >= 0 && batch_idx < max_batch_, IndexError,
           "PagedAttention.{}: batch_idx {} out of range [0, {}) (max_batch_size)", op, batch_idx, max_batch_);
}

void PagedAttention::sync_slot(int64_t batch_idx) {
  if (device_.is_cpu()) {
    page_table_.bump_version();
    physical_to_logical_.bump_version();
    capacity_.bump_version();
    return;
  }
  // copy_ bumps the device tensors' versions (what a saved capture checks against).
  page_table_.select(0, batch_idx).copy_(host_page_table_.select(0, batch_idx));
  physical_to_logical_.select(0, batch_idx).copy_(host_physical_to_logical_.select(0, batch_idx));
  capacity_.narrow(0, batch_idx, 1).copy_(host_capacity_.narrow(0, batch_idx, 1));
}

int64_t PagedAttention::capacity(int64_t batch_idx) const {
  check_slot(batch_idx, "capacity");
  return host_capacity_.data<int64_t>()[batch_idx];
}

std::vector<int64_t> PagedAttention::pages_of(int64_t batch_idx) const {
  check_slot(batch_idx, "pages_of");
  const int64_t* row = host_page_table_.data<int64_t>() + batch_idx * n_pages_;
  std::vector<int64_t> pages;
  for (int64_t i = 0; i < n_pages_ && row[i] >= 0; ++i) pages.push_back(row[i]);
  return pages;
}

void PagedAttention::reserve(int64_t batch_idx, int64_t seq_len) {
  check_slot(batch_idx, "reserve");
  FG_CHECK(seq_len >= 0, ValueError, "PagedAttention.reserve: seq_len must be >= 0, got {}", seq_len);
  int64_t* cap = host_capacity_.data<int64_t>() + batch_idx;
  if (seq_len <= *cap) return;
  const int64_t need = cdiv(seq_len - *cap, page_size_);
  const int64_t free_n = static_cast<int64_t>(empty_pages_.size());
  FG_CHECK(need <= free_n, ValueError,
           "PagedAttention.reserve: batch_idx {} needs {} more page(s) of {} tokens to hold seq_len {} (capacity {}), "
           "but only {} of {} pages are free",
           batch_idx, need, page_size_, seq_len, *cap, free_n, n_pages_);
  const int64_t start = *cap / page_size_;
  FG_ASSERT(start + need <= n_pages_);
  int64_t* row = host_page_table_.data<int64_t>() + batch_idx * n_pages_;
  int64_t* p2l = host_physical_to_logical_.data<int64_t>() + batch_idx * n_pages_;
  // As PyTorch: the last `need` entries of the free list, in list order, become logical pages start...
  const size_t first = empty_pages_.size() - static_cast<size_t>(need);
  for (int64_t i = 0; i < need; ++i) {
    const int64_t page = empty_pages_[first + static_cast<size_t>(i)];
    row[start + i] = page;
    p2l[page] = start + i;
  }
  empty_pages_.resize(first);
  *cap += need * page_size_;
  sync_slot(batch_idx);
}

void PagedAttention::erase(int64_t batch_idx) {
  check_slot(batch_idx, "erase");
  int64_t* row = host_page_table_.data<int64_t>() + batch_idx * n_pages_;
  int64_t* p2l = host_physical_to_logical_.data<int64_t>() + batch_idx * n_pages_;
  for (int64_t i = 0; i < n_pages_; ++i) {
    if (row[i] < 0) continue;
    empty_pages_.push_back(row[i]);
    p2l[row[i]] = -1;
    row[i] = -1;
  }
  host_capacity_.data<int64_t>()[batch_idx] = 0;
  sync_slot(batch_idx);
}

void PagedAttention::assign(const Tensor& batch_idx, const Tensor& input_pos, const Tensor& k_val,
                            const Tensor& v_val, const Tensor& k_cache, const Tensor& v_cache) const {
  const char* op = "assign";
  FG_CHECK(k_val.defined() && v_val.defined() && k_cache.defined() && v_cache.defined(), ValueError,
           "PagedAttention.assign: k_val, v_val, k_cache and v_cache must be defined");
  FG_CHECK(!k_val.requires_grad() && !v_val.requires_grad(), ValueError,
           "PagedAttention.assign: k_val / v_val must not require grad (the cache is written in place); detach them");
  FG_CHECK(k_val.dim() == 4 && v_val.dim() == 4, ShapeError,
           "PagedAttention.assign: k_val and v_val must be [B, H, S, D], got shapes {} and {}", shape_str(k_val.sizes()),
           shape_str(v_val.sizes()));
  FG_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4, ShapeError,
           "PagedAttention.assign: k_cache and v_cache must be [1, H, n_pages*page_size, D], got shapes {} and {}",
           shape_str(k_cache.sizes()), shape_str(v_cache.sizes()));
  const int64_t B = k_val.size(0), H = k_val.size(1), S = k_val.size(2), Dk = k_val.size(3), Dv = v_val.size(3);
  FG_CHECK(v_val.size(0) == B && v_val.size(1) == H && v_val.size(2) == S, ShapeError,
           "PagedAttention.assign: v_val shape {} does not match k_val shape {} in [B, H, S]", shape_str(v_val.sizes()),
           shape_str(k_val.sizes()));
  const int64_t L = max_cached_seq_len();
  FG_CHECK(k_cache.size(0) == 1 && k_cache.size(1) == H && k_cache.size(2) == L && k_cache.size(3) == Dk, ShapeError,
           "PagedAttention.assign: k_cache has shape {}, expected [1, {}, {}, {}] (H of k_val, n_pages*page_size, D of "
           "k_val {})",
           shape_str(k_cache.sizes()), H, L, Dk, shape_str(k_val.sizes()));
  FG_CHECK(v_cache.size(0) == 1 && v_cache.size(1) == H && v_cache.size(2) == L && v_cache.size(3) == Dv, ShapeError,
           "PagedAttention.assign: v_cache has shape {}, expected [1, {}, {}, {}] (H of v_val, n_pages*page_size, D of "
           "v_val {})",
           shape_str(v_cache.sizes()), H, L, Dv, shape_str(v_val.sizes()));
  FG_CHECK(k_val.dtype() == k_cache.dtype() && v_val.dtype() == v_cache.dtype(), DTypeError,
           "PagedAttention.assign: dtypes must match their cache: k_val {} vs k_cache {}, v_val {} vs v_cache {}",
           k_val.dtype(), k_cache.dtype(), v_val.dtype(), v_cache.dtype());
  FG_CHECK(k_val.device() == device_ && v_val.device() == device_ && k_cache.device() == device_ &&
               v_cache.device() == device_,
           DeviceError,
           "PagedAttention.assign: k_val, v_val, k_cache and v_cache must be on the PagedAttention's device {}, got "
           "{}, {}, {} and {}",
           device_, k_val.device(), v_val.device(), k_cache.device(), v_cache.device());
  FG_CHECK(batch_idx.defined() && input_pos.defined() && (batch_idx.is_cpu() || batch_idx.device() == device_) &&
               (input_pos.is_cpu() || input_pos.device() == device_),
           DeviceError, "PagedAttention.assign: batch_idx and input_pos must be defined, on the CPU or on {}, got {} and {}",
           device_, batch_idx.defined() ? fmt::format("{}", batch_idx.device()) : "undefined",
           input_pos.defined() ? fmt::format("{}", input_pos.device()) : "undefined");
  FG_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), ValueError,
           "PagedAttention.assign: k_cache and v_cache must be contiguous (they are written in place)");
  std::vector<int64_t> slots = int_values(batch_idx, op, "batch_idx", 1);
  std::vector<int64_t> pos = int_values(input_pos, op, "input_pos", 2);
  FG_CHECK(static_cast<int64_t>(slots.size()) == B, ShapeError,
           "PagedAttention.assign: batch_idx has {} entries but k_val has batch {} (shape {})", slots.size(), B,
           shape_str(k_val.sizes()));
  FG_CHECK(input_pos.size(0) == B && input_pos.size(1) == S, ShapeError,
           "PagedAttention.assign: input_pos has shape {}, expected [{}, {}] (B, S of k_val {})",
           shape_str(input_pos.sizes()), B, S, shape_str(k_val.sizes()));
  // Physical row of every (b, s); all checked before the first write.
  const int64_t* table = host_page_table_.data<int64_t>();
  const int64_t* cap = host_capacity_.data<int64_t>();
  std::vector<int64_t> addr(static_cast<size_t>(B * S));
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = slots[static_cast<size_t>(b)];
    FG_CHECK(slot >= 0 && slot < max_batch_, IndexError,
             "PagedAttention.assign: batch_idx[{}] = {} out of range [0, {}) (max_batch_size)", b, slot, max_batch_);
    for (int64_t s = 0; s < S; ++s) {
      const int64_t p = pos[static_cast<size_t>(b * S + s)];
      FG_CHECK(p >= 0 && p < cap[slot], IndexError,
               "PagedAttention.assign: input_pos[{}, {}] = {} is outside batch_idx {}'s reserved capacity {} (call "
               "reserve first)",
               b, s, p, slot, cap[slot]);
      const int64_t page = table[slot * n_pages_ + p / page_size_];
      FG_ASSERT(page >= 0);
      addr[static_cast<size_t>(b * S + s)] = page * page_size_ + p % page_size_;
    }
  }
  Tensor addr_t = to_device(from_vector(addr, {B * S}, kInt64), device_, /*non_blocking=*/true);
  paged_scatter_stub(device_, k_val.contiguous(), addr_t, k_cache);
  paged_scatter_stub(device_, v_val.contiguous(), addr_t, v_cache);
  k_cache.bump_version();
  v_cache.bump_version();
}

MaskMod PagedAttention::get_mask_mod(MaskMod mask_mod, const Tensor& kv_len, const Tensor& batch_idx) const {
  Tensor len = kv_len.defined() ? capturable_index(kv_len, device_, "get_mask_mod", "kv_len") : Tensor();
  Tensor slots = batch_idx.defined() ? capturable_index(batch_idx, device_, "get_mask_mod", "batch_idx") : Tensor();
  return paged_mask_mod(physical_to_logical_, page_size_, std::move(mask_mod), len, slots, /*max_batch=*/0);
}

ScoreMod PagedAttention::get_score_mod(ScoreMod score_mod, const Tensor& kv_len, const Tensor& batch_idx) const {
  Tensor len = kv_len.defined() ? capturable_index(kv_len, device_, "get_score_mod", "kv_len") : Tensor();
  Tensor slots = batch_idx.defined() ? capturable_index(batch_idx, device_, "get_score_mod", "batch_idx") : Tensor();
  if (!score_mod) score_mod = identity_score;
  return [p2l = physical_to_logical_, ps = page_size_, score_mod, len, slots](Expr s, Expr b, Expr h, Expr q,
                                                                              Expr kv) {
    Expr valid(false);
    Expr lkv = logical_kv(p2l, ps, b, kv, slots, len, /*max_batch=*/0, &valid);
    return where(valid, score_mod(s, b, h, q, lkv), -std::numeric_limits<double>::infinity());
  };
}

BlockMask PagedAttention::convert_logical_block_mask(const BlockMask& bm, const Tensor& batch_idx,
                                                     const Tensor& kv_len) const {
  const char* op = "convert_logical_block_mask";
  FG_CHECK(bm.kv_num_blocks().defined(), ValueError, "PagedAttention.{}: block_mask is empty", op);
  bm.check_unchanged("PagedAttention.convert_logical_block_mask");
  FG_CHECK(bm.device() == device_ || bm.device().is_cpu(), DeviceError,
           "PagedAttention.{}: block_mask is on {} but PagedAttention's tables are on {}; build the mask there or on "
           "the CPU (create_block_mask's device argument) or move its lists with BlockMask::from_kv_blocks", op,
           bm.device(), device_);
  FG_CHECK(bm.block_size().kv == page_size_, ValueError,
           "PagedAttention.{}: block_mask's kv block size {} must equal page_size {} (BLOCK_SIZE ({}, {}))", op,
           bm.block_size().kv, page_size_, bm.block_size().q, bm.block_size().kv);
  const int64_t Bm = bm.batch(), H = bm.heads(), nQ = bm.num_q_blocks();
  std::vector<int64_t> slots;
  if (batch_idx.defined()) {
    slots = int_values(batch_idx, op, "batch_idx", 1);
    FG_CHECK(Bm == 1 || Bm == static_cast<int64_t>(slots.size()), ShapeError,
             "PagedAttention.{}: batch_idx has {} entries but block_mask has batch {} (shape {})", op, slots.size(), Bm,
             shape_str(bm.shape()));
  } else {
    FG_CHECK(Bm <= max_batch_, ShapeError, "PagedAttention.{}: block_mask batch {} exceeds max_batch_size {}", op, Bm,
             max_batch_);
    for (int64_t b = 0; b < Bm; ++b) slots.push_back(b);
  }
  const int64_t N = static_cast<int64_t>(slots.size());
  for (int64_t i = 0; i < N; ++i)
    FG_CHECK(slots[static_cast<size_t>(i)] >= 0 && slots[static_cast<size_t>(i)] < max_batch_, IndexError,
             "PagedAttention.{}: batch_idx[{}] = {} out of range [0, {}) (max_batch_size)", op, i,
             slots[static_cast<size_t>(i)], max_batch_);
  // Valid logical length of each row: kv_len, capped by the logical mask's KV_LEN (its last block may stick out
  // past KV_LEN; in the physical cache those rows are real, so the mask must cut them).
  const int64_t logical_kv_len = bm.seq_lengths().second;
  std::vector<int64_t> lens(static_cast<size_t>(N), logical_kv_len);
  if (kv_len.defined()) {
    std::vector<int64_t> given = int_values(kv_len, op, "kv_len", 1);
    FG_CHECK(static_cast<int64_t>(given.size()) == N, ShapeError,
             "PagedAttention.{}: kv_len has {} entries, expected {} (one per batch entry)", op, given.size(), N);
    for (int64_t i = 0; i < N; ++i) lens[static_cast<size_t>(i)] = std::min(given[static_cast<size_t>(i)], logical_kv_len);
  }
  // The rewrite runs where the mask lives (paged_convert_stub): a device mask is converted on the device,
  // nothing read back. Slots and lengths were checked above; their device copies are private to the result.
  const bool has_full = bm.has_full_blocks();
  const TensorOptions i32 = TensorOptions(kInt32).device(device_);
  // A CPU mask's lists are uploaded without waiting (the result is on the tables' device either way).
  auto lists = [&](const Tensor& t) { return to_device(t.to(kInt32).contiguous(), device_, /*non_blocking=*/true); };
  PagedConvertArgs args;
  args.src_num = lists(bm.kv_num_blocks());
  args.src_idx = lists(bm.kv_indices());
  if (has_full) {
    args.src_fnum = lists(bm.full_kv_num_blocks());
    args.src_fidx = lists(bm.full_kv_indices());
    args.fnum = zeros({N, H, nQ}, i32);
    args.fidx = zeros({N, H, nQ, n_pages_}, i32);
  }
  args.table = page_table_;
  args.slots = to_device(from_vector(slots, {N}, kInt64), device_, /*non_blocking=*/true);
  args.lens = to_device(from_vector(lens, {N}, kInt64), device_, /*non_blocking=*/true);
  args.num = zeros({N, H, nQ}, i32);
  args.idx = zeros({N, H, nQ, n_pages_}, i32);
  args.page_size = page_size_;
  args.has_full = has_full;
  paged_convert_stub(device_, args);
  // The mask_mod reads the private slot copy (clamped: see logical_kv) only when batch_idx was given.
  Tensor slot_t = batch_idx.defined() ? args.slots : Tensor();
  return BlockMask::from_valid_kv_blocks(args.num, args.idx, args.fnum, args.fidx, bm.block_size(),
                                   paged_mask_mod(physical_to_logical_, page_size_, bm.mask_mod(), args.lens, slot_t,
                                                  max_batch_),
                                   std::make_pair(bm.seq_lengths().first, max_cached_seq_len()));
}

}  // namespace fg
