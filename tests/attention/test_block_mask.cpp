// BlockMask tests: PyTorch conformance (the block_*.npy files), printing, sparsity, indexing, adjust,
// from_kv_blocks, combinators.
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <nlohmann/json.hpp>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/tensor/npy.h"

using namespace fg;

namespace {

std::vector<int32_t> ints(const Tensor& t) {
  std::vector<int32_t> v;
  for (double x : t.to_vector()) v.push_back(static_cast<int32_t>(x));
  return v;
}

MaskMod causal() {
  return [](Expr, Expr, Expr q, Expr kv) { return q >= kv; };
}

// The PyTorch definitions of the conformance cases (README.md); noop_mask where a case has no mask_mod.
MaskMod case_mask(const std::string& name, const std::string& dir) {
  if (name == "alibi_causal" || name == "gqa_causal" || name == "learnable_relbias_table") return causal();
  if (name == "document_causal_s300") {
    Captured doc(fg::load_npy(dir + "/document_causal_s300.cap_doc.npy"), "doc");
    return [doc](Expr, Expr, Expr q, Expr kv) { return (doc[q] == doc[kv]) & (q >= kv); };
  }
  if (name == "sliding64_blk64") return [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 64); };
  if (name == "empty_rows") return [](Expr, Expr, Expr q, Expr kv) { return (q >= 40) & (kv <= q); };
  if (name == "prefix_lm_or") return or_masks(causal(), [](Expr, Expr, Expr, Expr kv) { return kv < 64; });
  if (name == "and_window_chunk")
    return and_masks([](Expr, Expr, Expr q, Expr kv) { return (q - kv).abs() <= 48; },
                     [](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 100) == floor_div(kv, 100); });
  return noop_mask;
}

}  // namespace

TEST(BlockMask, MatchesPyTorchConformance) {
  const std::string dir = fg::testing::conformance_dir();
  if (!std::filesystem::exists(dir + "/manifest.json"))
    GTEST_SKIP() << "no conformance data at " << dir << " (set FLEXGRAD_CONFORMANCE_DIR)";
  std::ifstream f(dir + "/manifest.json");
  nlohmann::json manifest = nlohmann::json::parse(f);
  int checked = 0;
  for (const auto& c : manifest) {
    const std::string name = c["case"];
    const std::string base = dir + "/" + name + ".block_";
    if (!std::filesystem::exists(base + "kv_num.npy")) continue;
    SCOPED_TRACE(name);
    BlockSize bs = c["block"].is_array() ? BlockSize(c["block"][0].get<int64_t>(), c["block"][1].get<int64_t>())
                                         : BlockSize(c["block"].get<int64_t>());
    Tensor kv_num = fg::load_npy(base + "kv_num.npy");
    // PyTorch built the masks with B and H of the files' first dims (1 = None, broadcast).
    const int64_t B = kv_num.size(0), H = kv_num.size(1);
    BlockMask m = create_block_mask(case_mask(name, dir), B == 1 ? std::nullopt : std::optional<int64_t>(B),
                                    H == 1 ? std::nullopt : std::optional<int64_t>(H), c["Sq"].get<int64_t>(),
                                    c["Skv"].get<int64_t>(), bs);
    EXPECT_EQ(m.kv_num_blocks().sizes(), kv_num.sizes());
    EXPECT_EQ(ints(m.kv_num_blocks()), ints(kv_num));
    EXPECT_EQ(ints(m.kv_indices()), ints(fg::load_npy(base + "kv_idx.npy")));
    EXPECT_EQ(ints(m.full_kv_num_blocks()), ints(fg::load_npy(base + "full_kv_num.npy")));
    EXPECT_EQ(ints(m.full_kv_indices()), ints(fg::load_npy(base + "full_kv_idx.npy")));
    // PyTorch's sparsity for the attention shape: the manifest records it with the q batch/heads, and
    // sparsity is a ratio, so it does not depend on B and H.
    EXPECT_NEAR(m.sparsity(), c["sparsity"].get<double>(), 1e-9);
    ++checked;
  }
  EXPECT_GE(checked, 13);
}

TEST(BlockMask, CausalPictureAndFields) {
  BlockMask m = create_block_mask(causal(), std::nullopt, std::nullopt, 512, 512, 128);
  EXPECT_EQ(m.shape(), (Shape{1, 1, 512, 512}));
  EXPECT_EQ(ints(m.kv_num_blocks()), (std::vector<int32_t>{1, 1, 1, 1}));       // diagonal blocks are partial
  EXPECT_EQ(ints(m.full_kv_num_blocks()), (std::vector<int32_t>{0, 1, 2, 3}));  // below the diagonal: full
  EXPECT_EQ(ints(m.full_kv_indices()), (std::vector<int32_t>{0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3}));
  EXPECT_EQ(ints(m.kv_indices()), (std::vector<int32_t>{0, 1, 2, 3, 1, 0, 2, 3, 2, 0, 1, 3, 3, 0, 1, 2}));
  // transposes for the backward: per kv block, the q blocks that visit it
  EXPECT_EQ(ints(m.full_q_num_blocks()), (std::vector<int32_t>{3, 2, 1, 0}));
  EXPECT_EQ(ints(m.full_q_indices()), (std::vector<int32_t>{1, 2, 3, 0, 2, 3, 0, 1, 3, 0, 1, 2, 0, 1, 2, 3}));
  EXPECT_EQ(ints(m.q_num_blocks()), (std::vector<int32_t>{1, 1, 1, 1}));
  EXPECT_EQ(ints(m.to_dense()), (std::vector<int32_t>{1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1}));
  EXPECT_EQ(ints(m.block_kinds()), (std::vector<int32_t>{1, 0, 0, 0, 2, 1, 0, 0, 2, 2, 1, 0, 2, 2, 2, 1}));
  EXPECT_EQ(m.to_string(), "(0, 0)\n██      \n████    \n██████  \n████████\n");
  EXPECT_EQ(m.to_string({20, 20}, 4, true), "(0, 0)\n▓▓      \n██▓▓    \n████▓▓  \n██████▓▓\n");
  EXPECT_EQ(m.str(), "BlockMask(shape=(1, 1, 512, 512), sparsity=37.50%, \n(0, 0)\n██      \n████    \n██████  \n████████\n)");
  EXPECT_DOUBLE_EQ(m.sparsity(), 37.5);
  EXPECT_NE(m.repr().find("kv_indices=[1, 1, 4, 4]"), std::string::npos);
  EXPECT_NE(m.repr().find("mask_mod=q_idx >= kv_idx"), std::string::npos);
  std::ostringstream os;
  os << m;
  EXPECT_EQ(os.str(), m.str());
  // downsampled picture: 2x2 groups of blocks
  EXPECT_EQ(m.to_string({2, 2}), "(0, 0)\n░░  \n██░░\n");
  ASSERT_TRUE(m.mask_program());
  EXPECT_EQ(m.mask_program()->to_string(), "q_idx >= kv_idx");
}

TEST(BlockMask, PartialLastBlocksAndSparsity) {
  // 300 = 2 * 128 + 44: the last blocks stick out and are never full (as PyTorch).
  BlockMask m = create_block_mask(noop_mask, 2, 3, 300, 200, BlockSize(128, 64));
  EXPECT_EQ(m.kv_num_blocks().sizes(), (Shape{2, 3, 3}));
  EXPECT_EQ(m.kv_indices().sizes(), (Shape{2, 3, 3, 4}));
  std::vector<int32_t> full = ints(m.full_kv_num_blocks()), part = ints(m.kv_num_blocks());
  for (int r = 0; r < 18; ++r) {
    EXPECT_EQ(full[r], r % 3 == 2 ? 0 : 3);
    EXPECT_EQ(part[r], r % 3 == 2 ? 4 : 1);
  }
  // 100 * (1 - 12 blocks * 128*64 / (300*200)) per (b, h)
  EXPECT_NEAR(m.sparsity(), 100.0 * (1 - 12.0 * 128 * 64 / (300.0 * 200)), 1e-12);
  // a mask using b and h
  auto bh = create_block_mask([](Expr b, Expr h, Expr q, Expr) { return (b + h) * 64 <= q; }, 2, 2, 256, 256, 64);
  std::vector<int32_t> d = ints(bh.to_dense());
  // (b=1, h=1): rows q < 128 masked -> q-blocks 0 and 1 empty
  for (int kb = 0; kb < 4; ++kb) {
    EXPECT_EQ(d[(3 * 4 + 0) * 4 + kb], 0);
    EXPECT_EQ(d[(3 * 4 + 1) * 4 + kb], 0);
    EXPECT_EQ(d[(3 * 4 + 2) * 4 + kb], 1);
    EXPECT_EQ(d[(0 * 4 + 0) * 4 + kb], 1);
  }
}

TEST(BlockMask, IndexingAndAdjust) {
  auto mm = [](Expr b, Expr h, Expr q, Expr kv) { return (q >= kv) | ((b == 1) & (h == 0)); };
  BlockMask m = create_block_mask(mm, 2, 2, 256, 256, 64);
  BlockMask b1 = m[1];
  EXPECT_EQ(b1.shape(), (Shape{1, 2, 256, 256}));
  BlockMask b1h0 = m.select(1, 0), b1h1 = m.select(-1, -1);
  EXPECT_EQ(b1h0.shape(), (Shape{1, 1, 256, 256}));
  EXPECT_EQ(ints(b1h0.to_dense()), std::vector<int32_t>(16, 1));  // all allowed
  EXPECT_EQ(ints(b1h1.to_dense()), ints(m.select(0, 0).to_dense()));
  EXPECT_EQ(ints(b1h0.full_kv_num_blocks()), (std::vector<int32_t>{4, 4, 4, 4}));
  EXPECT_THROW(m.select(2, 0), IndexError);
  EXPECT_THROW(m[-3], IndexError);
  // adjust to a shorter sequence keeps the leading blocks
  BlockMask a = m.select(0, 0).adjust(100, 150);
  EXPECT_EQ(a.shape(), (Shape{1, 1, 100, 150}));
  EXPECT_EQ(a.kv_indices().sizes(), (Shape{1, 1, 2, 3}));
  EXPECT_EQ(ints(a.to_dense()), (std::vector<int32_t>{1, 0, 0, 1, 1, 0}));
  EXPECT_EQ(ints(a.q_num_blocks()), (std::vector<int32_t>{1, 1, 0}));
  EXPECT_THROW(m.adjust(512, 256), ValueError);
  // to_string limit
  std::string s = m.to_string({20, 20}, 2);
  EXPECT_NE(s.find("(0, 1)"), std::string::npos);
  EXPECT_EQ(s.find("(1, 0)"), std::string::npos);
  EXPECT_NE(s.find("To print out more"), std::string::npos);
}

TEST(BlockMask, FromKvBlocks) {
  BlockMask ref = create_block_mask(causal(), std::nullopt, std::nullopt, 256, 256, 64);
  BlockMask m = BlockMask::from_kv_blocks(ref.kv_num_blocks(), ref.kv_indices(), ref.full_kv_num_blocks(),
                                          ref.full_kv_indices(), 64, causal());
  EXPECT_EQ(ints(m.q_indices()), ints(ref.q_indices()));
  EXPECT_EQ(ints(m.full_q_num_blocks()), ints(ref.full_q_num_blocks()));
  EXPECT_EQ(m.seq_lengths(), (std::pair<int64_t, int64_t>{256, 256}));
  // without full blocks: everything visited is partial; no mask_mod means noop
  BlockMask p = BlockMask::from_kv_blocks(ref.kv_num_blocks(), ref.kv_indices());
  EXPECT_FALSE(p.has_full_blocks());
  EXPECT_EQ(p.block_size().q, 128);
  EXPECT_EQ(p.mask_program()->to_string(), "true");
  EXPECT_EQ(p.shape(), (Shape{1, 1, 512, 512}));
  // int64 inputs are accepted; malformed ones are named
  Tensor num = from_vector(std::vector<int64_t>{1, 2}, {1, 1, 2}, kInt64);
  Tensor idx = from_vector(std::vector<int64_t>{0, 1, 0, 1}, {1, 1, 2, 2}, kInt64);
  BlockMask s = BlockMask::from_kv_blocks(num, idx, Tensor(), Tensor(), 16, nullptr, std::make_pair(int64_t{20}, int64_t{32}));
  EXPECT_EQ(ints(s.to_dense()), (std::vector<int32_t>{1, 0, 1, 1}));
  EXPECT_THROW(BlockMask::from_kv_blocks(num, from_vector(std::vector<int64_t>{5, 0, 0, 1}, {1, 1, 2, 2}, kInt64)),
               IndexError);
  EXPECT_THROW(BlockMask::from_kv_blocks(idx, idx), ShapeError);
  EXPECT_THROW(BlockMask::from_kv_blocks(num, idx, num, Tensor()), ValueError);
  EXPECT_THROW(BlockMask::from_kv_blocks(num, idx, Tensor(), Tensor(), 16, nullptr, std::make_pair(int64_t{64}, int64_t{32})),
               ShapeError);
}

// A built mask's lists, lengths and BLOCK_SIZE agree (the kernels index with them unchecked), so they are
// read-only: assigning seq_lengths or block_size of a built mask used to compile and then crash flex_attention.
template <class M> concept SeqLengthsAssignable = requires(M& m) { m.seq_lengths = std::pair<int64_t, int64_t>{1, 1}; };
template <class M> concept SeqLengthsCallAssignable = requires(M& m) { m.seq_lengths().first = 1; };
template <class M> concept BlockSizeAssignable = requires(M& m) { m.block_size = BlockSize(1); };
template <class M> concept BlockSizeCallAssignable = requires(M& m) { m.block_size().q = 1; };
template <class M> concept ListsAssignable = requires(M& m) { m.kv_num_blocks() = Tensor(); };
template <class M> concept MaskProgramAssignable = requires(M& m) { m.mask_program() = nullptr; };

// The visited-block count (visited_blocks.h) of a CPU mask is known at once: causal at 1000 x 1000 in blocks of
// 128 visits 1 + 2 + ... + 8 = 36 blocks a (batch, head), over B 2 x H 3: 216; from_kv_blocks counts its own
// (both lists, as sparsity() does); masks derived by select / operator[] / adjust carry none.
TEST(BlockMask, VisitedBlockCountIsKnownAtOnceOnTheCpu) {
  BlockMask m = create_block_mask(causal(), 2, 3, 1000, 1000, 128);
  ASSERT_TRUE(m.visited_blocks());
  EXPECT_EQ(m.visited_blocks()->known(), std::optional<int64_t>(216));
  EXPECT_DOUBLE_EQ(m.sparsity(), 100.0 * (1.0 - 216.0 * 128 * 128 / (6.0 * 1000 * 1000)));
  // The partial blocks alone: the diagonal of rows 0-6, and all 8 of row 7 (it sticks out past Q_LEN): 15 a plane.
  BlockMask partial_only = BlockMask::from_kv_blocks(m.kv_num_blocks(), m.kv_indices());
  ASSERT_TRUE(partial_only.visited_blocks());
  EXPECT_EQ(partial_only.visited_blocks()->known(), std::optional<int64_t>(90));
  BlockMask twice = BlockMask::from_kv_blocks(m.kv_num_blocks(), m.kv_indices(), m.kv_num_blocks(), m.kv_indices());
  EXPECT_EQ(twice.visited_blocks()->known(), std::optional<int64_t>(180));
  EXPECT_EQ(m.select(0, 0).visited_blocks(), nullptr);
  EXPECT_EQ(m[1].visited_blocks(), nullptr);
  EXPECT_EQ(m.adjust(500, 500).visited_blocks(), nullptr);
  EXPECT_DOUBLE_EQ(m.select(0, 0).sparsity(), 100.0 * (1.0 - 36.0 * 128 * 128 / (1000.0 * 1000)));
}

TEST(BlockMask, FieldsCannotBeChangedAfterConstruction) {
  static_assert(!SeqLengthsAssignable<BlockMask> && !SeqLengthsCallAssignable<BlockMask>);
  static_assert(!BlockSizeAssignable<BlockMask> && !BlockSizeCallAssignable<BlockMask>);
  static_assert(!ListsAssignable<BlockMask> && !MaskProgramAssignable<BlockMask>);
  BlockMask none;
  EXPECT_FALSE(none.defined());
  EXPECT_TRUE(create_block_mask(causal(), std::nullopt, std::nullopt, 32, 32, 16).defined());
  // The list tensors are shared handles: an in-place write through one is caught before the kernels read it.
  for (int which : {0, 1, 2}) {
    BlockMask m = create_block_mask(causal(), std::nullopt, std::nullopt, 32, 32, 16);
    EXPECT_NO_THROW(m.check_unchanged("test"));
    Tensor t = which == 0 ? m.kv_num_blocks() : which == 1 ? m.full_q_indices() : m.kv_indices();
    t.fill_(1000);
    EXPECT_THROW_MSG(m.check_unchanged("test"), ValueError, "modified in place");
    Tensor q = randn({1, 1, 32, 8});
    FlexAttentionOptions o;
    o.block_mask = m;
    EXPECT_THROW_MSG(flex_attention(q, q, q, o), ValueError, "flex_attention", "modified in place");
  }
}

TEST(BlockMask, Combinators) {
  auto window = [](Expr, Expr, Expr q, Expr kv) { return (q - kv).abs() <= 16; };
  BlockMask c = create_block_mask(causal(), std::nullopt, std::nullopt, 128, 128, 16);
  BlockMask w = create_block_mask(window, std::nullopt, std::nullopt, 128, 128, 16);
  BlockMask a = create_block_mask(and_masks(causal(), window), std::nullopt, std::nullopt, 128, 128, 16);
  BlockMask o = create_block_mask(or_masks(causal(), window), std::nullopt, std::nullopt, 128, 128, 16);
  BlockMask n = create_block_mask(not_mask(causal()), std::nullopt, std::nullopt, 128, 128, 16);
  std::vector<int32_t> dc = ints(c.to_dense()), dw = ints(w.to_dense()), da = ints(a.to_dense()),
                       dor = ints(o.to_dense()), dn = ints(n.to_dense());
  std::vector<int32_t> kc = ints(c.block_kinds()), kn = ints(n.block_kinds());
  // The and-mask's blocks from the rule itself, element by element: visited iff some entry of the block
  // is both causal and in the window (an empty or all-visited mask cannot pass).
  std::vector<int32_t> want_and(dc.size(), 0);
  for (int64_t qi = 0; qi < 128; ++qi)
    for (int64_t ki = 0; ki < 128; ++ki)
      if (qi >= ki && std::abs(qi - ki) <= 16) want_and[(qi / 16) * 8 + ki / 16] = 1;
  ASSERT_EQ(da.size(), want_and.size());
  EXPECT_EQ(da, want_and);
  for (size_t i = 0; i < dc.size(); ++i) {
    EXPECT_LE(da[i], std::min(dc[i], dw[i]));
    EXPECT_EQ(dor[i], std::max(dc[i], dw[i]));
    EXPECT_EQ(dn[i], kc[i] != 2);       // not causal: visited wherever causal is not full
    EXPECT_EQ(kn[i] == 2, kc[i] == 0);  // and full where causal is empty
  }
  EXPECT_EQ(a.mask_program()->to_string(), "q_idx >= kv_idx & abs(q_idx - kv_idx) <= 16");
  EXPECT_EQ(n.mask_program()->to_string(), "!(q_idx >= kv_idx)");
  EXPECT_EQ(trace_mask_mod(or_masks()).to_string(), "false");
  EXPECT_EQ(trace_mask_mod(and_masks()).to_string(), "true");
  EXPECT_THROW(and_masks(MaskMod()), ValueError);
  // errors from the mask propagate out of the parallel construction
  Captured small(from_vector(std::vector<int64_t>{0, 1}, {2}, kInt64), "small");
  EXPECT_THROW(create_block_mask([small](Expr, Expr, Expr q, Expr) { return small[q] == 0; }, std::nullopt,
                                 std::nullopt, 64, 64, 16),
               IndexError);
  EXPECT_THROW(create_block_mask(causal(), 0, 1, 64, 64), ValueError);
  EXPECT_THROW(create_block_mask([](Expr, Expr, Expr q, Expr) { return to_float(q); }, 1, 1, 64, 64), ValueError);
}
