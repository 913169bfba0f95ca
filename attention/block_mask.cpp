// BlockMask construction and utilities (see block_mask.h).
#include "attention/block_mask.h"

#include <exception>
#include <mutex>

#include "attention/tile_eval.h"

namespace fg {

namespace {

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Dense presence [rows x cols] per (b, h) -> (num [B,H,R], indices [B,H,R,C]): present blocks ascending,
// then absent ones ascending (PyTorch's stable descending argsort of the dense mask).
std::pair<Tensor, Tensor> dense_to_ordered(const std::vector<uint8_t>& dense, int64_t B, int64_t H, int64_t R,
                                           int64_t C) {
  Tensor num = empty({B, H, R}, kInt32), idx = empty({B, H, R, C}, kInt32);
  int32_t* n = num.data<int32_t>();
  int32_t* ix = idx.data<int32_t>();
  for (int64_t row = 0; row < B * H * R; ++row) {
    const uint8_t* d = dense.data() + row * C;
    int32_t* out = ix + row * C;
    int32_t k = 0;
    for (int64_t c = 0; c < C; ++c)
      if (d[c]) out[k++] = static_cast<int32_t>(c);
    n[row] = k;
    for (int64_t c = 0; c < C; ++c)
      if (!d[c]) out[k++] = static_cast<int32_t>(c);
  }
  return {num, idx};
}

// (num, indices) -> dense presence [B*H*R*C].
std::vector<uint8_t> ordered_to_dense(const Tensor& num, const Tensor& idx) {
  const int64_t R = idx.size(2), C = idx.size(3);
  const int64_t rows = idx.size(0) * idx.size(1) * R;
  std::vector<uint8_t> dense(static_cast<size_t>(rows * C), 0);
  const int32_t* n = num.data<int32_t>();
  const int32_t* ix = idx.data<int32_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int32_t k = 0; k < n[r]; ++k) dense[r * C + ix[r * C + k]] = 1;
  return dense;
}

std::vector<uint8_t> transpose_dense(const std::vector<uint8_t>& d, int64_t BH, int64_t R, int64_t C) {
  std::vector<uint8_t> t(d.size());
  for (int64_t p = 0; p < BH; ++p)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t c = 0; c < C; ++c) t[(p * C + c) * R + r] = d[(p * R + r) * C + c];
  return t;
}

// Validated contiguous int32 copy of a user-supplied block tensor.
Tensor checked_copy(const Tensor& t, const char* name, int64_t rank) {
  FG_CHECK(t.defined(), ValueError, "BlockMask.from_kv_blocks: {} is undefined", name);
  FG_CHECK(t.dim() == rank, ShapeError, "BlockMask.from_kv_blocks: {} must have {} dims ([B, H, ...]), got shape {}",
           name, rank, shape_str(t.sizes()));
  FG_CHECK(is_integral(t.dtype()), DTypeError, "BlockMask.from_kv_blocks: {} must be an integer tensor, got {}", name,
           t.dtype());
  Tensor c = empty(t.sizes(), kInt32);
  std::vector<double> v = t.to_vector();
  int32_t* p = c.data<int32_t>();
  for (size_t i = 0; i < v.size(); ++i) p[i] = static_cast<int32_t>(v[i]);
  return c;
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

// Builds every field from dense partial / full block presence.
BlockMask assemble(const std::vector<uint8_t>& partial, const std::vector<uint8_t>* full, int64_t B, int64_t H,
                   int64_t nQ, int64_t nKV, BlockSize bs, MaskMod mask_mod,
                   std::shared_ptr<const ModProgram> program, std::pair<int64_t, int64_t> seq) {
  BlockMask m;
  std::tie(m.kv_num_blocks, m.kv_indices) = dense_to_ordered(partial, B, H, nQ, nKV);
  std::tie(m.q_num_blocks, m.q_indices) = dense_to_ordered(transpose_dense(partial, B * H, nQ, nKV), B, H, nKV, nQ);
  if (full) {
    std::tie(m.full_kv_num_blocks, m.full_kv_indices) = dense_to_ordered(*full, B, H, nQ, nKV);
    std::tie(m.full_q_num_blocks, m.full_q_indices) =
        dense_to_ordered(transpose_dense(*full, B * H, nQ, nKV), B, H, nKV, nQ);
  }
  m.block_size = bs;
  m.mask_mod = mask_mod ? std::move(mask_mod) : MaskMod(noop_mask);
  m.mask_program = program ? std::move(program)
                           : std::make_shared<const ModProgram>(trace_mask_mod(m.mask_mod));
  m.seq_lengths = seq;
  return m;
}

}  // namespace

BlockMask create_block_mask(const MaskMod& mask_mod, std::optional<int64_t> B_opt, std::optional<int64_t> H_opt,
                            int64_t Q_LEN, int64_t KV_LEN, BlockSize bs) {
  const int64_t B = (!B_opt || *B_opt == -1) ? 1 : *B_opt;
  const int64_t H = (!H_opt || *H_opt == -1) ? 1 : *H_opt;
  FG_CHECK(B >= 1 && H >= 1, ValueError, "create_block_mask: B and H must be >= 1 (or absent), got B={} H={}", B, H);
  FG_CHECK(Q_LEN >= 1 && KV_LEN >= 1, ValueError, "create_block_mask: Q_LEN and KV_LEN must be >= 1, got {} and {}",
           Q_LEN, KV_LEN);
  FG_CHECK(bs.q >= 1 && bs.kv >= 1, ValueError, "create_block_mask: BLOCK_SIZE must be positive, got ({}, {})", bs.q,
           bs.kv);
  auto program = std::make_shared<const ModProgram>(trace_mask_mod(mask_mod ? mask_mod : MaskMod(noop_mask)));
  const int64_t nQ = cdiv(Q_LEN, bs.q), nKV = cdiv(KV_LEN, bs.kv);
  // Masks that ignore b (or h) are evaluated for one b (h) and copied: most masks ignore both.
  const int64_t Be = program->uses(kUsesBatch) ? B : 1, He = program->uses(kUsesHead) ? H : 1;
  std::vector<uint8_t> partial(static_cast<size_t>(B * H * nQ * nKV)), full(partial.size());
  const int64_t block_area = bs.q * bs.kv;
  std::exception_ptr error;
  std::mutex error_mutex;
#pragma omp parallel
  {
    std::optional<TileEvaluator<float>> ev;
    try {
      ev.emplace(*program);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
#pragma omp for schedule(dynamic)
    for (int64_t job = 0; job < Be * He * nQ; ++job) {
      if (!ev) continue;
      const int64_t qb = job % nQ, h = (job / nQ) % He, b = job / (nQ * He);
      const int64_t q0 = qb * bs.q, nq = std::min(bs.q, Q_LEN - q0);
      try {
        for (int64_t kb = 0; kb < nKV; ++kb) {
          const int64_t kv0 = kb * bs.kv, nkv = std::min(bs.kv, KV_LEN - kv0);
          ev->run(b, h, q0, nq, kv0, nkv);
          const int64_t count = ev->count_true();
          const size_t at = static_cast<size_t>(((b * H + h) * nQ + qb) * nKV + kb);
          full[at] = count == block_area;
          partial[at] = count > 0 && count < block_area;
        }
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (!error) error = std::current_exception();
      }
    }
  }
  if (error) std::rethrow_exception(error);
  // Broadcast the evaluated (b, h) planes to the ones skipped above.
  const size_t plane = static_cast<size_t>(nQ * nKV);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      if (b < Be && h < He) continue;
      const size_t src = static_cast<size_t>((std::min(b, Be - 1) * H + std::min(h, He - 1))) * plane;
      const size_t dst = static_cast<size_t>(b * H + h) * plane;
      std::copy_n(partial.begin() + src, plane, partial.begin() + dst);
      std::copy_n(full.begin() + src, plane, full.begin() + dst);
    }
  return assemble(partial, &full, B, H, nQ, nKV, bs, mask_mod, program, {Q_LEN, KV_LEN});
}

BlockMask BlockMask::from_kv_blocks(const Tensor& kv_num, const Tensor& kv_idx, const Tensor& full_num,
                                    const Tensor& full_idx, BlockSize bs, MaskMod mask_mod,
                                    std::optional<std::pair<int64_t, int64_t>> seq) {
  FG_CHECK(bs.q >= 1 && bs.kv >= 1, ValueError, "BlockMask.from_kv_blocks: BLOCK_SIZE must be positive, got ({}, {})",
           bs.q, bs.kv);
  Tensor n = checked_copy(kv_num, "kv_num_blocks", 3), ix = checked_copy(kv_idx, "kv_indices", 4);
  check_ordered(n, ix, "kv_num_blocks", "kv_indices");
  const int64_t B = ix.size(0), H = ix.size(1), nQ = ix.size(2), nKV = ix.size(3);
  std::vector<uint8_t> partial = ordered_to_dense(n, ix), full;
  FG_CHECK(full_num.defined() == full_idx.defined(), ValueError,
           "BlockMask.from_kv_blocks: full_kv_num_blocks and full_kv_indices must be given together");
  if (full_num.defined()) {
    Tensor fn = checked_copy(full_num, "full_kv_num_blocks", 3), fi = checked_copy(full_idx, "full_kv_indices", 4);
    check_ordered(fn, fi, "full_kv_num_blocks", "full_kv_indices");
    FG_CHECK(fi.sizes() == ix.sizes(), ShapeError,
             "BlockMask.from_kv_blocks: full_kv_indices has shape {} but kv_indices has shape {}",
             shape_str(fi.sizes()), shape_str(ix.sizes()));
    full = ordered_to_dense(fn, fi);
  }
  auto lengths = seq.value_or(std::make_pair(nQ * bs.q, nKV * bs.kv));
  FG_CHECK(cdiv(lengths.first, bs.q) == nQ && cdiv(lengths.second, bs.kv) == nKV, ShapeError,
           "BlockMask.from_kv_blocks: seq_lengths ({}, {}) need ({}, {}) blocks of ({}, {}) but kv_indices has shape {}",
           lengths.first, lengths.second, cdiv(lengths.first, bs.q), cdiv(lengths.second, bs.kv), bs.q, bs.kv,
           shape_str(ix.sizes()));
  return assemble(partial, full_num.defined() ? &full : nullptr, B, H, nQ, nKV, bs, std::move(mask_mod), nullptr,
                  lengths);
}

double BlockMask::sparsity() const {
  auto sum = [](const Tensor& t) {
    int64_t s = 0;
    const int32_t* p = t.data<int32_t>();
    for (int64_t i = 0; i < t.numel(); ++i) s += p[i];
    return s;
  };
  int64_t blocks = sum(kv_num_blocks) + (has_full_blocks() ? sum(full_kv_num_blocks) : 0);
  const double dense_ratio = static_cast<double>(blocks * block_size.q * block_size.kv) / static_cast<double>(numel());
  return 100.0 * (1.0 - dense_ratio);
}

Tensor BlockMask::block_kinds() const {
  std::vector<uint8_t> p = ordered_to_dense(kv_num_blocks, kv_indices);
  std::vector<uint8_t> f = has_full_blocks() ? ordered_to_dense(full_kv_num_blocks, full_kv_indices)
                                             : std::vector<uint8_t>(p.size(), 0);
  Tensor out = empty({batch(), heads(), num_q_blocks(), num_kv_blocks()}, kInt32);
  int32_t* o = out.data<int32_t>();
  for (size_t i = 0; i < p.size(); ++i) o[i] = f[i] ? 2 : p[i] ? 1 : 0;
  return out;
}

Tensor BlockMask::to_dense() const {
  Tensor k = block_kinds();
  int32_t* o = k.data<int32_t>();
  for (int64_t i = 0; i < k.numel(); ++i) o[i] = o[i] != 0;
  return k;
}

std::string BlockMask::to_string(std::pair<int64_t, int64_t> grid, int64_t limit, bool show_partial) const {
  Tensor kinds = block_kinds();
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
      sh(kv_num_blocks), sh(kv_indices), sh(full_kv_num_blocks), sh(full_kv_indices), sh(q_num_blocks), sh(q_indices),
      sh(full_q_num_blocks), sh(full_q_indices), block_size.q, block_size.kv, s[0], s[1], s[2], s[3], sparsity(),
      mask_program ? mask_program->to_string() : std::string("None"));
}

std::ostream& operator<<(std::ostream& os, const BlockMask& m) { return os << m.str(); }

BlockMask BlockMask::select(int64_t b, int64_t h) const {
  FG_CHECK(b >= -batch() && b < batch(), IndexError, "BlockMask[b, h]: batch index {} out of range for B={}", b, batch());
  FG_CHECK(h >= -heads() && h < heads(), IndexError, "BlockMask[b, h]: head index {} out of range for H={}", h, heads());
  if (b < 0) b += batch();
  if (h < 0) h += heads();
  const int64_t R = num_q_blocks(), C = num_kv_blocks(), plane = R * C, H = heads();
  auto cut = [&](const std::vector<uint8_t>& d) {
    return std::vector<uint8_t>(d.begin() + (b * H + h) * plane, d.begin() + (b * H + h + 1) * plane);
  };
  std::vector<uint8_t> p = cut(ordered_to_dense(kv_num_blocks, kv_indices)), f;
  if (has_full_blocks()) f = cut(ordered_to_dense(full_kv_num_blocks, full_kv_indices));
  return assemble(p, has_full_blocks() ? &f : nullptr, 1, 1, R, C, block_size, mask_mod, mask_program, seq_lengths);
}

BlockMask BlockMask::operator[](int64_t b) const {
  FG_CHECK(b >= -batch() && b < batch(), IndexError, "BlockMask[b]: batch index {} out of range for B={}", b, batch());
  if (b < 0) b += batch();
  const int64_t plane = heads() * num_q_blocks() * num_kv_blocks();
  auto cut = [&](const std::vector<uint8_t>& d) {
    return std::vector<uint8_t>(d.begin() + b * plane, d.begin() + (b + 1) * plane);
  };
  std::vector<uint8_t> p = cut(ordered_to_dense(kv_num_blocks, kv_indices)), f;
  if (has_full_blocks()) f = cut(ordered_to_dense(full_kv_num_blocks, full_kv_indices));
  return assemble(p, has_full_blocks() ? &f : nullptr, 1, heads(), num_q_blocks(), num_kv_blocks(), block_size,
                  mask_mod, mask_program, seq_lengths);
}

BlockMask BlockMask::adjust(int64_t new_q_len, int64_t new_kv_len) const {
  FG_CHECK(new_q_len >= 1 && new_kv_len >= 1, ValueError, "BlockMask.adjust: lengths must be >= 1, got ({}, {})",
           new_q_len, new_kv_len);
  const int64_t R = num_q_blocks(), C = num_kv_blocks();
  const int64_t nr = cdiv(new_q_len, block_size.q), nc = cdiv(new_kv_len, block_size.kv);
  FG_CHECK(nr <= R && nc <= C, ValueError,
           "BlockMask.adjust: ({}, {}) needs {} x {} blocks of ({}, {}) but the mask has {} x {}; create a new BlockMask "
           "for longer sequences", new_q_len, new_kv_len, nr, nc, block_size.q, block_size.kv, R, C);
  auto crop = [&](const std::vector<uint8_t>& d) {
    std::vector<uint8_t> o(static_cast<size_t>(batch() * heads() * nr * nc));
    for (int64_t p = 0; p < batch() * heads(); ++p)
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t c = 0; c < nc; ++c) o[(p * nr + r) * nc + c] = d[(p * R + r) * C + c];
    return o;
  };
  std::vector<uint8_t> p = crop(ordered_to_dense(kv_num_blocks, kv_indices)), f;
  if (has_full_blocks()) f = crop(ordered_to_dense(full_kv_num_blocks, full_kv_indices));
  return assemble(p, has_full_blocks() ? &f : nullptr, batch(), heads(), nr, nc, block_size, mask_mod, mask_program,
                  {new_q_len, new_kv_len});
}

}  // namespace fg
