// BlockMask construction and utilities (see block_mask.h). Every method is device-agnostic: the work
// that depends on the device (evaluating the mask_mod, building block lists, lists -> dense) goes through
// the stubs of block_mask_kernels.h; the rest are tensor views and small reads for printing.
#include "flexgrad/attention/block_mask.h"

#include "flexgrad/attention/block_mask_kernels.h"
#include "flexgrad/ops/ops.h"

namespace fg {

FG_DEFINE_STUB(BlockMaskEvalFn, block_mask_eval_stub);
FG_DEFINE_STUB(BlockBitsFn, block_bits_stub);
FG_DEFINE_STUB(BlockListsFn, block_lists_stub);
FG_DEFINE_STUB(VisitedBlocksFn, visited_blocks_stub);

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Validated contiguous int32 CPU copy of a user-supplied block tensor (checked on the CPU: these are
// small, and the messages name the offending entry).
Tensor checked_copy(const Tensor& t, const char* name, int64_t rank) {
  FG_CHECK(t.defined(), ValueError, "BlockMask.from_kv_blocks: {} is undefined", name);
  FG_CHECK(t.dim() == rank, ShapeError, "BlockMask.from_kv_blocks: {} must have {} dims ([B, H, ...]), got shape {}",
           name, rank, shape_str(t.sizes()));
  FG_CHECK(is_integral(t.dtype()), DTypeError, "BlockMask.from_kv_blocks: {} must be an integer tensor, got {}", name,
           t.dtype());
  return t.to(kCPU).to(kInt32).contiguous();
}

void check_ordered(const Tensor& num, const Tensor& idx, const char* num_name, const char* idx_name) {
  FG_CHECK(num.sizes() == Shape(idx.sizes().begin(), idx.sizes().end() - 1), ShapeError,
           "BlockMask.from_kv_blocks: {} has shape {} but {} has shape {} (expected {} = {} without its last dim)",
           num_name, shape_str(num.sizes()), idx_name, shape_str(idx.sizes()), num_name, idx_name);
  const int64_t C = idx.size(3);
  const int32_t* n = num.data<int32_t>();
  const int32_t* ix = idx.data<int32_t>();
  for (int64_t r = 0; r < num.numel(); ++r) {
    FG_CHECK(n[r] >= 0 && n[r] <= C, ValueError, "BlockMask.from_kv_blocks: {} holds {} at flat position {}; expected 0..{}",
             num_name, n[r], r, C);
    for (int32_t k = 0; k < n[r]; ++k)
      FG_CHECK(ix[r * C + k] >= 0 && ix[r * C + k] < C, IndexError,
               "BlockMask.from_kv_blocks: {} holds block index {} (row {}), expected 0..{}", idx_name, ix[r * C + k], r,
               C - 1);
  }
}

// The mask's block bits, on its device.
Tensor bits_of(const BlockMask& m) {
  return block_bits_stub(m.device(), m.kv_num_blocks().contiguous(), m.kv_indices().contiguous(),
                         m.has_full_blocks() ? m.full_kv_num_blocks().contiguous() : Tensor(),
                         m.has_full_blocks() ? m.full_kv_indices().contiguous() : Tensor());
}

}  // namespace

// Builds every field from block bits (block_mask_kernels.h), on the bits' device.
BlockMask BlockMask::assemble(const Tensor& bits, bool with_full, BlockSize bs, MaskMod mask_mod,
                              std::shared_ptr<const ModProgram> program, std::pair<int64_t, int64_t> seq) {
  BlockMask m;
  BlockLists8 l = block_lists_stub(bits.device(), bits, with_full);
  m.kv_num_blocks_ = std::move(l.kv_num);
  m.kv_indices_ = std::move(l.kv_idx);
  m.full_kv_num_blocks_ = std::move(l.full_kv_num);
  m.full_kv_indices_ = std::move(l.full_kv_idx);
  m.q_num_blocks_ = std::move(l.q_num);
  m.q_indices_ = std::move(l.q_idx);
  m.full_q_num_blocks_ = std::move(l.full_q_num);
  m.full_q_indices_ = std::move(l.full_q_idx);
  m.block_size_ = bs;
  m.mask_mod_ = mask_mod ? std::move(mask_mod) : MaskMod(noop_mask);
  m.mask_program_ = program ? std::move(program) : std::make_shared<const ModProgram>(trace_mask_mod(m.mask_mod_));
  m.seq_lengths_ = seq;
  for (const Tensor* t : m.lists()) m.versions_.push_back(t->defined() ? t->version() : 0);
  return m;
}

std::vector<const Tensor*> BlockMask::lists() const {
  return {&kv_num_blocks_, &kv_indices_, &full_kv_num_blocks_, &full_kv_indices_,
          &q_num_blocks_,  &q_indices_,  &full_q_num_blocks_,  &full_q_indices_};
}

void BlockMask::check_unchanged(const char* who) const {
  static const char* names[] = {"kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                                "q_num_blocks",  "q_indices",  "full_q_num_blocks",  "full_q_indices"};
  const std::vector<const Tensor*> l = lists();
  for (size_t i = 0; i < l.size() && i < versions_.size(); ++i) {
    FG_CHECK(!l[i]->defined() || l[i]->version() == versions_[i], ValueError,
             "{}: the BlockMask's {} was modified in place after the mask was built (version {}, built at {}); "
             "build a new mask (BlockMask::from_kv_blocks) instead", who, names[i], l[i]->version(), versions_[i]);
  }
}

BlockMask create_block_mask(const MaskMod& mask_mod, std::optional<int64_t> B_opt, std::optional<int64_t> H_opt,
                            int64_t Q_LEN, int64_t KV_LEN, BlockSize bs, Device device) {
  const int64_t B = (!B_opt || *B_opt == -1) ? 1 : *B_opt;
  const int64_t H = (!H_opt || *H_opt == -1) ? 1 : *H_opt;
  FG_CHECK(B >= 1 && H >= 1, ValueError, "create_block_mask: B and H must be >= 1 (or absent), got B={} H={}", B, H);
  FG_CHECK(Q_LEN >= 1 && KV_LEN >= 1, ValueError, "create_block_mask: Q_LEN and KV_LEN must be >= 1, got {} and {}",
           Q_LEN, KV_LEN);
  FG_CHECK(bs.q >= 1 && bs.kv >= 1, ValueError, "create_block_mask: BLOCK_SIZE must be positive, got ({}, {})", bs.q,
           bs.kv);
  auto program = std::make_shared<const ModProgram>(trace_mask_mod(mask_mod ? mask_mod : MaskMod(noop_mask)));
  Tensor bits = block_mask_eval_stub(device, *program, B, H, Q_LEN, KV_LEN, bs, device);
  BlockMask m = BlockMask::assemble(bits, true, bs, mask_mod, program, {Q_LEN, KV_LEN});
  m.visited_ = visited_blocks_stub(device, m.kv_num_blocks_, m.full_kv_num_blocks_);
  return m;
}

BlockMask BlockMask::from_kv_blocks(const Tensor& kv_num, const Tensor& kv_idx, const Tensor& full_num,
                                    const Tensor& full_idx, BlockSize bs, MaskMod mask_mod,
                                    std::optional<std::pair<int64_t, int64_t>> seq) {
  FG_CHECK(bs.q >= 1 && bs.kv >= 1, ValueError, "BlockMask.from_kv_blocks: BLOCK_SIZE must be positive, got ({}, {})",
           bs.q, bs.kv);
  Tensor n = checked_copy(kv_num, "kv_num_blocks", 3), ix = checked_copy(kv_idx, "kv_indices", 4);
  const Device dev = kv_num.device();
  FG_CHECK(kv_idx.device() == dev, DeviceError,
           "BlockMask.from_kv_blocks: kv_indices is on {} but kv_num_blocks is on {}; expected one device", kv_idx.device(),
           dev);
  check_ordered(n, ix, "kv_num_blocks", "kv_indices");
  const int64_t nQ = ix.size(2), nKV = ix.size(3);
  FG_CHECK(full_num.defined() == full_idx.defined(), ValueError,
           "BlockMask.from_kv_blocks: full_kv_num_blocks and full_kv_indices must be given together");
  Tensor fn, fi;
  if (full_num.defined()) {
    fn = checked_copy(full_num, "full_kv_num_blocks", 3);
    fi = checked_copy(full_idx, "full_kv_indices", 4);
    FG_CHECK(full_num.device() == dev && full_idx.device() == dev, DeviceError,
             "BlockMask.from_kv_blocks: full_kv_num_blocks / full_kv_indices are on {} / {} but kv_num_blocks is on {}; "
             "expected one device", full_num.device(), full_idx.device(), dev);
    check_ordered(fn, fi, "full_kv_num_blocks", "full_kv_indices");
    FG_CHECK(fi.sizes() == ix.sizes(), ShapeError,
             "BlockMask.from_kv_blocks: full_kv_indices has shape {} but kv_indices has shape {}",
             shape_str(fi.sizes()), shape_str(ix.sizes()));
  }
  auto lengths = seq.value_or(std::make_pair(nQ * bs.q, nKV * bs.kv));
  FG_CHECK(cdiv(lengths.first, bs.q) == nQ && cdiv(lengths.second, bs.kv) == nKV, ShapeError,
           "BlockMask.from_kv_blocks: seq_lengths ({}, {}) need ({}, {}) blocks of ({}, {}) but kv_indices has shape {}",
           lengths.first, lengths.second, cdiv(lengths.first, bs.q), cdiv(lengths.second, bs.kv), bs.q, bs.kv,
           shape_str(ix.sizes()));
  // The validated int32 copies go back to the tensors' device, where the lists are built.
  auto on_dev = [&](const Tensor& t) { return t.defined() ? t.to(dev) : t; };
  Tensor bits = block_bits_stub(dev, on_dev(n), on_dev(ix), on_dev(fn), on_dev(fi));
  BlockMask m = assemble(bits, full_num.defined(), bs, std::move(mask_mod), nullptr, lengths);
  m.visited_ = visited_blocks_stub(dev, m.kv_num_blocks_, m.full_kv_num_blocks_);
  return m;
}

BlockMask BlockMask::from_valid_kv_blocks(const Tensor& kv_num, const Tensor& kv_idx, const Tensor& full_num,
                                          const Tensor& full_idx, BlockSize bs, MaskMod mask_mod,
                                          std::pair<int64_t, int64_t> seq) {
  Tensor bits = block_bits_stub(kv_num.device(), kv_num, kv_idx, full_num, full_idx);
  return assemble(bits, full_num.defined(), bs, std::move(mask_mod), nullptr, seq);
}

double BlockMask::sparsity() const {
  // The count where the host has it; else integer sums (int64, exact) on the mask's device, one scalar back.
  std::optional<int64_t> known = visited_ ? visited_->known() : std::nullopt;
  int64_t blocks = 0;
  if (known) {
    blocks = *known;
  } else {
    blocks = sum(kv_num_blocks_).item<int64_t>();
    if (has_full_blocks()) blocks += sum(full_kv_num_blocks_).item<int64_t>();
  }
  const double dense_ratio = static_cast<double>(blocks * block_size_.q * block_size_.kv) / static_cast<double>(numel());
  return 100.0 * (1.0 - dense_ratio);
}

Tensor BlockMask::block_kinds() const {
  // A block listed both partial and full (possible through from_kv_blocks) is full.
  return clamp(bits_of(*this), std::nullopt, Scalar(kBlockFullBit));
}

Tensor BlockMask::to_dense() const { return (bits_of(*this) != 0).to(kInt32); }

std::string BlockMask::to_string(std::pair<int64_t, int64_t> grid, int64_t limit, bool show_partial) const {
  Tensor kinds = block_kinds().to(kCPU);  // the picture is drawn on the CPU
  const int32_t* k = kinds.data<int32_t>();
  const int64_t R = num_q_blocks(), C = num_kv_blocks();
  const int64_t max_rows = grid.first == -1 ? R : grid.first, max_cols = grid.second == -1 ? C : grid.second;
  FG_CHECK(max_rows >= 1 && max_cols >= 1, ValueError, "BlockMask.to_string: grid must be positive or -1, got ({}, {})",
           grid.first, grid.second);
  const int64_t row_step = std::max<int64_t>(1, cdiv(R, max_rows)), col_step = std::max<int64_t>(1, cdiv(C, max_cols));
  std::vector<std::string> parts;
  int64_t idx = 0;
  for (int64_t b = 0; b < batch(); ++b)
    for (int64_t h = 0; h < heads(); ++h, ++idx) {
      if (idx == limit) {
        parts.push_back("...");
        parts.push_back("To print out more, set BlockMask.to_string(limit=N)");
        parts.push_back("You can also index (BlockMask[batch, head]) to choose a specific batch or head");
        goto done;
      }
      {
        std::string vis = fmt::format("({}, {})\n", b, h);
        const int32_t* plane = k + (b * heads() + h) * R * C;
        for (int64_t r = 0; r < R; r += row_step) {
          for (int64_t c = 0; c < C; c += col_step) {
            int64_t visited = 0, fulls = 0, cells = 0;
            for (int64_t rr = r; rr < std::min(R, r + row_step); ++rr)
              for (int64_t cc = c; cc < std::min(C, c + col_step); ++cc) {
                ++cells;
                visited += plane[rr * C + cc] != 0;
                fulls += plane[rr * C + cc] == 2;
              }
            const char* ch = visited == cells ? ((show_partial && fulls != cells) ? "▓" : "█") : visited == 0 ? " " : "░";
            vis += ch;
            vis += ch;
          }
          vis += "\n";
        }
        parts.push_back(std::move(vis));
      }
    }
done:
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i ? "\n" : "") + parts[i];
  return out;
}

std::string BlockMask::str() const {
  std::string pic = to_string();
  const auto ws = " \t\n\r\f\v";
  const size_t first = pic.find_first_not_of(ws), last = pic.find_last_not_of(ws);
  pic = first == std::string::npos ? "" : pic.substr(first, last - first + 1);
  Shape s = shape();
  return fmt::format("BlockMask(shape=({}, {}, {}, {}), sparsity={:.2f}%, \n{}\n)", s[0], s[1], s[2], s[3], sparsity(),
                     pic);
}

std::string BlockMask::repr() const {
  auto sh = [](const Tensor& t) { return t.defined() ? shape_str(t.sizes()) : std::string("None"); };
  Shape s = shape();
  return fmt::format(
      "BlockMask(\n    kv_num_blocks={},\n    kv_indices={},\n    full_kv_num_blocks={},\n    full_kv_indices={},\n"
      "    q_num_blocks={},\n    q_indices={},\n    full_q_num_blocks={},\n    full_q_indices={},\n"
      "    BLOCK_SIZE=({}, {}),\n    shape=({}, {}, {}, {}),\n    sparsity={:.2f}%,\n    mask_mod={}\n)",
      sh(kv_num_blocks_), sh(kv_indices_), sh(full_kv_num_blocks_), sh(full_kv_indices_), sh(q_num_blocks_), sh(q_indices_),
      sh(full_q_num_blocks_), sh(full_q_indices_), block_size_.q, block_size_.kv, s[0], s[1], s[2], s[3], sparsity(),
      mask_program_ ? mask_program_->to_string() : std::string("None"));
}

std::ostream& operator<<(std::ostream& os, const BlockMask& m) { return os << m.str(); }

BlockMask BlockMask::select(int64_t b, int64_t h) const {
  FG_CHECK(b >= -batch() && b < batch(), IndexError, "BlockMask[b, h]: batch index {} out of range for B={}", b, batch());
  FG_CHECK(h >= -heads() && h < heads(), IndexError, "BlockMask[b, h]: head index {} out of range for H={}", h, heads());
  if (b < 0) b += batch();
  if (h < 0) h += heads();
  Tensor bits = bits_of(*this).narrow(0, b, 1).narrow(1, h, 1).contiguous();
  return assemble(bits, has_full_blocks(), block_size_, mask_mod_, mask_program_, seq_lengths_);
}

BlockMask BlockMask::operator[](int64_t b) const {
  FG_CHECK(b >= -batch() && b < batch(), IndexError, "BlockMask[b]: batch index {} out of range for B={}", b, batch());
  if (b < 0) b += batch();
  Tensor bits = bits_of(*this).narrow(0, b, 1).contiguous();
  return assemble(bits, has_full_blocks(), block_size_, mask_mod_, mask_program_, seq_lengths_);
}

BlockMask BlockMask::adjust(int64_t new_q_len, int64_t new_kv_len) const {
  FG_CHECK(new_q_len >= 1 && new_kv_len >= 1, ValueError, "BlockMask.adjust: lengths must be >= 1, got ({}, {})",
           new_q_len, new_kv_len);
  const int64_t R = num_q_blocks(), C = num_kv_blocks();
  const int64_t nr = cdiv(new_q_len, block_size_.q), nc = cdiv(new_kv_len, block_size_.kv);
  FG_CHECK(nr <= R && nc <= C, ValueError,
           "BlockMask.adjust: ({}, {}) needs {} x {} blocks of ({}, {}) but the mask has {} x {}; create a new BlockMask "
           "for longer sequences", new_q_len, new_kv_len, nr, nc, block_size_.q, block_size_.kv, R, C);
  Tensor bits = bits_of(*this).narrow(2, 0, nr).narrow(3, 0, nc).contiguous();
  return assemble(bits, has_full_blocks(), block_size_, mask_mod_, mask_program_, {new_q_len, new_kv_len});
}

}  // namespace fg
