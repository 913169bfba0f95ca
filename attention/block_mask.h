// BlockMask: block-sparse description of a mask_mod, as torch.nn.attention.flex_attention.BlockMask.
//
// The [Q_LEN, KV_LEN] mask is cut into BLOCK_SIZE = (q, kv) blocks (the last ones may stick out past the
// sequence). Each block is
//   empty   — no allowed entry: the kernels never visit it;
//   full    — every entry of the whole block (padding included) allowed: visited, mask not evaluated;
//   partial — anything else: visited and the mask_mod is evaluated per entry.
// As PyTorch, a block that sticks out past Q_LEN/KV_LEN counts the out-of-range entries as masked, so it
// is at best partial (the conformance files show PyTorch's create_block_mask doing exactly this).
//
// Layout (all int32, contiguous), for the forward (rows = q blocks):
//   kv_num_blocks [B, H, nQ]        number of partial blocks in each row
//   kv_indices    [B, H, nQ, nKV]   their kv-block indices, ascending, first kv_num_blocks valid
//   full_kv_num_blocks / full_kv_indices: the same for full blocks (undefined Tensors when absent)
// and their transposes for the backward (rows = kv blocks): q_num_blocks [B, H, nKV], q_indices
// [B, H, nKV, nQ], full_q_num_blocks, full_q_indices. Entries past the count hold the absent block
// indices in ascending order (exactly what PyTorch's stable argsort leaves there).
#pragma once
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/attention/visited_blocks.h"

namespace fg {

struct BlockSize {
  int64_t q = 128, kv = 128;
  BlockSize(int64_t both = 128) : q(both), kv(both) {}  // NOLINT: BLOCK_SIZE=64 as in PyTorch
  BlockSize(int64_t q_, int64_t kv_) : q(q_), kv(kv_) {}
};

class BlockMask {
 public:
  // A default-constructed mask holds nothing (defined() is false); flex_attention and the other users
  // reject it. Real masks come from create_block_mask, from_kv_blocks or the methods below.
  BlockMask() = default;

  // Build from the kv-side description; transposes are derived. seq_lengths default to the block
  // grid's extent (nQ * BLOCK_SIZE.q, nKV * BLOCK_SIZE.kv), as PyTorch. The full pair may be undefined.
  // The mask lives on the tensors' device (DeviceError when they are on different ones).
  // ShapeError / DTypeError / IndexError naming the argument on malformed input.
  static BlockMask from_kv_blocks(const Tensor& kv_num_blocks, const Tensor& kv_indices,
                                  const Tensor& full_kv_num_blocks = Tensor(), const Tensor& full_kv_indices = Tensor(),
                                  BlockSize block_size = 128, MaskMod mask_mod = nullptr,
                                  std::optional<std::pair<int64_t, int64_t>> seq_lengths = std::nullopt);

  // Read-only views of the fields: the kernels trust that the lists, the lengths and BLOCK_SIZE agree
  // (validated once, when the mask is built), so they cannot be changed afterwards. The tensors are shared
  // handles: an in-place op on one of them is caught at use (check_unchanged); build a new mask with
  // from_kv_blocks instead.
  bool defined() const { return kv_num_blocks_.defined(); }
  // ValueError naming `who` when one of the lists was modified in place since the mask was built (its
  // storage version moved). flex_attention and PagedAttention call it before reading the lists.
  void check_unchanged(const char* who) const;
  std::pair<int64_t, int64_t> seq_lengths() const { return seq_lengths_; }  // (Q_LEN, KV_LEN)
  const Tensor& kv_num_blocks() const { return kv_num_blocks_; }
  const Tensor& kv_indices() const { return kv_indices_; }
  const Tensor& full_kv_num_blocks() const { return full_kv_num_blocks_; }  // undefined when the mask does not
  const Tensor& full_kv_indices() const { return full_kv_indices_; }        // separate full blocks
  const Tensor& q_num_blocks() const { return q_num_blocks_; }
  const Tensor& q_indices() const { return q_indices_; }
  const Tensor& full_q_num_blocks() const { return full_q_num_blocks_; }
  const Tensor& full_q_indices() const { return full_q_indices_; }
  BlockSize block_size() const { return block_size_; }
  const MaskMod& mask_mod() const { return mask_mod_; }  // noop_mask when none was given
  // mask_mod traced once (kernels evaluate partial blocks with it).
  const std::shared_ptr<const ModProgram>& mask_program() const { return mask_program_; }

  // Where the block lists live (the device create_block_mask built them on, or the one the
  // from_kv_blocks tensors were on). Every method works on every device; the results stay there.
  Device device() const { return kv_num_blocks_.device(); }
  int64_t batch() const { return kv_num_blocks_.size(0); }
  int64_t heads() const { return kv_num_blocks_.size(1); }
  int64_t num_q_blocks() const { return kv_indices_.size(2); }
  int64_t num_kv_blocks() const { return kv_indices_.size(3); }
  bool has_full_blocks() const { return full_kv_num_blocks_.defined(); }

  Shape shape() const { return {batch(), heads(), seq_lengths_.first, seq_lengths_.second}; }
  int64_t numel() const { return shape_numel(shape()); }
  // Percent of the [B, H, Q_LEN, KV_LEN] mask not computed, as PyTorch: 100 * (1 - visited blocks *
  // block area / numel). Negative when padded blocks make the visited area exceed the mask. Reads the count
  // back from the device (a synchronisation) only while visited_blocks() does not know it yet.
  double sparsity() const;
  // The visited blocks (partial + full over the batch, heads and q-block rows) as the host knows them without
  // waiting (visited_blocks.h): masks from create_block_mask and from_kv_blocks count theirs where they are
  // built; the ones derived by select, operator[], adjust and PagedAttention's conversion (built every decoding
  // step) carry none (null).
  const std::shared_ptr<const VisitedBlocks>& visited_blocks() const { return visited_; }
  // int32 [B, H, nQ, nKV] on device(): 1 where a block is visited (partial or full).
  Tensor to_dense() const;
  // 0 empty, 1 partial, 2 full (int32 [B, H, nQ, nKV] on device()).
  Tensor block_kinds() const;
  // PyTorch's picture: per (b, h) a "(b, h)" line then one row per group of q blocks, two characters per
  // group of kv blocks: "█" all visited, " " none, "░" mixed. grid = (max rows, max cols), -1 = no
  // downsampling; at most `limit` (b, h) pairs. With show_partial, visited cells whose blocks are not all
  // full print "▓" (PyTorch does not distinguish them).
  std::string to_string(std::pair<int64_t, int64_t> grid = {20, 20}, int64_t limit = 4, bool show_partial = false) const;
  // PyTorch's str(block_mask): "BlockMask(shape=(B, H, Q, KV), sparsity=S%, \n<picture>\n)".
  std::string str() const;
  // PyTorch's repr(block_mask): the field shapes, BLOCK_SIZE, shape, sparsity and the traced mask_mod.
  std::string repr() const;

  // Selecting one batch entry / one (batch, head) keeps rank 4 (B = 1, H = 1) so kernels see one layout.
  BlockMask operator[](int64_t b) const;
  BlockMask select(int64_t b, int64_t h) const;
  // For shorter sequences (e.g. decoding): keeps the blocks covering [0, new_q_len) x [0, new_kv_len).
  // ValueError when the new lengths need more blocks than the mask has.
  BlockMask adjust(int64_t new_q_len, int64_t new_kv_len) const;

 private:
  friend class PagedAttention;  // convert_logical_block_mask builds lists it has no need to re-check
  friend BlockMask create_block_mask(const MaskMod&, std::optional<int64_t>, std::optional<int64_t>, int64_t, int64_t,
                                     BlockSize, Device);
  std::vector<const Tensor*> lists() const;  // the eight list fields, in declaration order
  // Every field from block bits (block_mask_kernels.h), on the bits' device.
  static BlockMask assemble(const Tensor& bits, bool with_full, BlockSize bs, MaskMod mask_mod,
                            std::shared_ptr<const ModProgram> program, std::pair<int64_t, int64_t> seq);
  // from_kv_blocks without its checks (which read the lists back to the host): for lists flexgrad itself built
  // valid (int32, contiguous, one device, counts and indices in range), so a device mask stays on the device.
  static BlockMask from_valid_kv_blocks(const Tensor& kv_num, const Tensor& kv_idx, const Tensor& full_num,
                                        const Tensor& full_idx, BlockSize bs, MaskMod mask_mod,
                                        std::pair<int64_t, int64_t> seq);

  std::pair<int64_t, int64_t> seq_lengths_{0, 0};
  Tensor kv_num_blocks_, kv_indices_;
  Tensor full_kv_num_blocks_, full_kv_indices_;
  Tensor q_num_blocks_, q_indices_;
  Tensor full_q_num_blocks_, full_q_indices_;
  BlockSize block_size_;
  MaskMod mask_mod_;
  std::shared_ptr<const ModProgram> mask_program_;
  std::vector<uint32_t> versions_;  // of the eight lists' storages when built (0 for an absent list)
  std::shared_ptr<const VisitedBlocks> visited_;  // null where not counted (visited_blocks())
};

// Prints str().
std::ostream& operator<<(std::ostream& os, const BlockMask& m);

// Evaluate mask_mod on every block and classify blocks, on `device` (PyTorch's device=): on the CPU with
// the tile evaluator (OpenMP over (b, h, q block)), on CUDA with a kernel generated from the traced
// mask_mod (captured tensors must then be on that device: DeviceError otherwise), the lists built there.
// B / H absent (std::nullopt or -1) mean 1, broadcast over batch / heads, as PyTorch's B=None.
BlockMask create_block_mask(const MaskMod& mask_mod, std::optional<int64_t> B, std::optional<int64_t> H,
                            int64_t Q_LEN, int64_t KV_LEN, BlockSize block_size = 128, Device device = kCPU);

}  // namespace fg
