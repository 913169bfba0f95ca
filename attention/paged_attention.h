// PagedAttention: many sequences of different lengths in one shared, paged K/V cache, attended through
// flex_attention without gathering them together — torch.nn.attention.experimental._paged_attention.
//
// The cache is [1, H, n_pages * page_size, D]: n_pages physical pages of page_size tokens. Each batch slot
// owns a list of pages; logical token t of slot b lives at physical row
//     page_table[b][t / page_size] * page_size + t % page_size.
// flex_attention then runs over (q, k_cache, v_cache) with
//   - convert_logical_block_mask(): the logical BlockMask with every kv-block index replaced by its
//     physical page (so page_size must equal the mask's kv block size), physical KV_LEN n_pages*page_size;
//   - get_mask_mod() / get_score_mod(): mods that map the physical kv index back to the logical one through
//     physical_to_logical and mask unowned pages and logical positions >= kv_len[b].
// and gives the same result as flex_attention over the unpaged K/V.
//
// Tables (int64 on the PagedAttention's device, CPU or CUDA; updated in place so mods that captured them
// see the current state):
//   page_table          [max_batch_size, n_pages]  physical page of each logical page, -1 where none
//   physical_to_logical [max_batch_size, n_pages]  logical page of each physical page for that slot, or -1
//   capacity            [max_batch_size]           tokens reserved per slot (a multiple of page_size)
// On CUDA the tables live on the GPU, where the kernels and the mods read them, and a host copy is kept in
// step: reserve / erase change the host copy and upload the rows they changed (no device read, no sync), and
// argument checks read it. The free list is host-side, as in PyTorch (only reserve / erase use it).
// Free pages are handed out as PyTorch does (lowest ids first from a fresh pool, erased pages reused last in,
// first out), so a given sequence of calls yields PyTorch's page table.
#pragma once
#include <cstdint>
#include <vector>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/expr.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

class PagedAttention {
 public:
  // ValueError for non-positive sizes. The caches, block masks and index tensors given to the methods live on
  // `device` too (DeviceError otherwise).
  PagedAttention(int64_t n_pages, int64_t page_size, int64_t max_batch_size, Device device = kCPU);

  // Allocates pages until slot batch_idx holds at least seq_len tokens; no-op when it already does.
  // IndexError for a bad slot, ValueError for a negative seq_len or when the free pool has too few pages
  // (nothing is changed then).
  void reserve(int64_t batch_idx, int64_t seq_len);
  // Returns every page of the slot to the pool; capacity becomes 0. IndexError for a bad slot.
  void erase(int64_t batch_idx);

  // Writes k_val / v_val [B, H, S, D] (D may differ between K and V) for logical positions input_pos [B, S]
  // of slots batch_idx [B] into k_cache / v_cache [1, H, n_pages*page_size, D], all on the device (batch_idx
  // and input_pos may also be CPU tensors: a decode loop knows them on the host; device ones are read back,
  // which synchronises). Everything is validated before anything is written: ShapeError / DTypeError
  // (mismatched shapes or dtypes), DeviceError, IndexError (slot out of range, position < 0 or >= the slot's
  // reserved capacity), ValueError (values requiring grad, non-contiguous caches).
  void assign(const Tensor& batch_idx, const Tensor& input_pos, const Tensor& k_val, const Tensor& v_val,
              const Tensor& k_cache, const Tensor& v_cache) const;

  // The logical block_mask [B, H, nQ, nKV] of (Q_LEN, KV_LEN) as a mask over the physical cache: kv indices
  // are physical pages, KV_LEN is n_pages*page_size, the mask_mod is get_mask_mod(mask_mod, kv_len).
  // batch_idx [N] (default arange(B), as PyTorch) picks the slot of each query batch entry (a B=1 mask is broadcast to
  // N); kv_len [N] (optional) the valid length of each, capped at the logical KV_LEN (rows past it are masked
  // too: in the cache they hold other tokens or nothing). Logical blocks on unassigned pages or starting at or
  // past kv_len are dropped; full blocks that reach past kv_len become partial so the mask cuts them.
  // block_mask may be on the tables' device or on the CPU (its lists are then uploaded without the host waiting);
  // the result is on the tables' device, converted there. batch_idx / kv_len given as host tensors are checked
  // without reading the GPU: a decoding step through a CUDA PagedAttention then never waits for the GPU.
  // ValueError when block_mask's kv block size != page_size; ShapeError / IndexError for bad batch_idx/kv_len.
  BlockMask convert_logical_block_mask(const BlockMask& block_mask, const Tensor& batch_idx = Tensor(),
                                       const Tensor& kv_len = Tensor()) const;

  // mask_mod / score_mod over logical kv indices, wrapped to take physical ones: false / -inf for pages the
  // query's slot does not own and for logical kv >= kv_len[b] (when kv_len is given). The query batch index b
  // is the slot, unless batch_idx is given (then the slot is batch_idx[b]). The inner mod receives b, and a
  // logical kv index that is 0 where masked (so it may index captured tensors safely). An empty mod means
  // noop_mask / identity. kv_len and batch_idx (int [N]) are captured by reference when they are int32/int64
  // on the device, else as an int64 copy on the device.
  MaskMod get_mask_mod(MaskMod mask_mod, const Tensor& kv_len = Tensor(), const Tensor& batch_idx = Tensor()) const;
  ScoreMod get_score_mod(ScoreMod score_mod, const Tensor& kv_len = Tensor(), const Tensor& batch_idx = Tensor()) const;

  int64_t n_pages() const { return n_pages_; }
  int64_t page_size() const { return page_size_; }
  int64_t max_batch_size() const { return max_batch_; }
  int64_t max_cached_seq_len() const { return n_pages_ * page_size_; }  // the cache's physical length
  Device device() const { return device_; }
  const Tensor& page_table() const { return page_table_; }
  const Tensor& physical_to_logical() const { return physical_to_logical_; }
  const Tensor& capacity() const { return capacity_; }
  int64_t capacity(int64_t batch_idx) const;
  // Free pages, the next one handed out last.
  const std::vector<int64_t>& empty_pages() const { return empty_pages_; }
  int64_t pages_in_use() const { return n_pages_ - static_cast<int64_t>(empty_pages_.size()); }
  // Pages owned by a slot, in logical order.
  std::vector<int64_t> pages_of(int64_t batch_idx) const;

 private:
  void check_slot(int64_t batch_idx, const char* op) const;
  // Uploads slot `batch_idx`'s rows of the host tables to the device ones (no-op on the CPU).
  void sync_slot(int64_t batch_idx);

  int64_t n_pages_, page_size_, max_batch_;
  Device device_;
  Tensor page_table_, physical_to_logical_, capacity_;           // on device_ (what mods capture)
  Tensor host_page_table_, host_physical_to_logical_, host_capacity_;  // CPU; the same tensors when device_ is the CPU
  std::vector<int64_t> empty_pages_;
};

}  // namespace fg
