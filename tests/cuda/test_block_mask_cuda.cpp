// BlockMask on CUDA: create_block_mask(..., device=cuda) evaluates the mask_mod with a generated kernel and
// builds the lists on the device. Goldens: the CPU BlockMask field by field (counts AND index tensors,
// the full rows including the absent-block tail), PyTorch's BlockMasks of the conformance files, and a
// brute-force classification written here from a plain C++ predicate. Skips without a GPU.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/tensor/npy.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/jit.h"
#endif

namespace fg {
namespace {

std::vector<int64_t> ints(const Tensor& t) {
  std::vector<int64_t> v;
  for (double x : t.to(kCPU).to_vector()) v.push_back(static_cast<int64_t>(x));
  return v;
}

Expr causal(Expr, Expr, Expr q, Expr kv) { return q >= kv; }

class BlockMaskCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the BlockMask CUDA tests";
  }
  static constexpr Device dev = kCUDA;

  // One field of a device mask equals the CPU one: defined alike, on the device, int32, same values.
  static void expect_field(const Tensor& d, const Tensor& c, const char* name) {
    SCOPED_TRACE(name);
    ASSERT_EQ(d.defined(), c.defined());
    if (!c.defined()) return;
    EXPECT_EQ(d.device(), dev);
    EXPECT_EQ(d.dtype(), kInt32);
    EXPECT_EQ(d.sizes(), c.sizes());
    EXPECT_EQ(ints(d), ints(c));
  }
  static void expect_same(const BlockMask& d, const BlockMask& c) {
    ASSERT_EQ(d.device(), dev);
    expect_field(d.kv_num_blocks(), c.kv_num_blocks(), "kv_num_blocks");
    expect_field(d.kv_indices(), c.kv_indices(), "kv_indices");
    expect_field(d.full_kv_num_blocks(), c.full_kv_num_blocks(), "full_kv_num_blocks");
    expect_field(d.full_kv_indices(), c.full_kv_indices(), "full_kv_indices");
    expect_field(d.q_num_blocks(), c.q_num_blocks(), "q_num_blocks");
    expect_field(d.q_indices(), c.q_indices(), "q_indices");
    expect_field(d.full_q_num_blocks(), c.full_q_num_blocks(), "full_q_num_blocks");
    expect_field(d.full_q_indices(), c.full_q_indices(), "full_q_indices");
    EXPECT_EQ(d.seq_lengths(), c.seq_lengths());
    EXPECT_EQ(d.block_size().q, c.block_size().q);
    EXPECT_EQ(d.block_size().kv, c.block_size().kv);
    ASSERT_TRUE(d.mask_program() && c.mask_program());
    EXPECT_EQ(d.mask_program()->to_string(), c.mask_program()->to_string());
  }
  // create_block_mask on both devices; the device one must equal the CPU one.
  static BlockMask both(const MaskMod& mm, std::optional<int64_t> B, std::optional<int64_t> H, int64_t Q, int64_t KV,
                        BlockSize bs) {
    BlockMask c = create_block_mask(mm, B, H, Q, KV, bs);
    BlockMask d = create_block_mask(mm, B, H, Q, KV, bs, dev);
    expect_same(d, c);
    return d;
  }
};

TEST_F(BlockMaskCuda, MasksBlockSizesAndRaggedLengthsEqualTheCpu) {
  const MaskMod window = [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 200); };
  const MaskMod prefix_lm = or_masks(MaskMod(causal), MaskMod([](Expr, Expr, Expr, Expr kv) { return kv < 100; }));
  const MaskMod chunk = and_masks(MaskMod([](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 90; }),
                                  MaskMod([](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 150) == floor_div(kv, 150); }));
  const std::vector<std::pair<const char*, MaskMod>> masks = {
      {"causal", causal}, {"sliding window", window}, {"prefix-LM or_masks", prefix_lm},
      {"and_masks", chunk}, {"noop", noop_mask}};
  const std::vector<BlockSize> sizes = {BlockSize(64), BlockSize(128), BlockSize(128, 64)};
  const std::vector<std::pair<int64_t, int64_t>> lengths = {{512, 512}, {300, 457}, {1000, 77}, {1, 129}};
  for (const auto& [name, mm] : masks)
    for (const BlockSize& bs : sizes)
      for (const auto& [Q, KV] : lengths) {
        SCOPED_TRACE(fmt::format("{} BLOCK_SIZE=({}, {}) Q_LEN={} KV_LEN={}", name, bs.q, bs.kv, Q, KV));
        both(mm, std::nullopt, std::nullopt, Q, KV, bs);
      }
}

// Rows longer than one warp's 32 columns (the list kernel scans a row 32 columns per ballot): wide rows
// (one q block against 63-132 kv blocks, as a paged decode step's converted mask), tall ones (their transposed
// lists), and square grids of 33-132 blocks.
TEST_F(BlockMaskCuda, ListsLongerThanOneWarpEqualTheCpu) {
  const MaskMod window = [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 700); };
  const std::vector<std::pair<int64_t, int64_t>> lengths = {{64, 4000}, {4000, 64}, {2100, 2100}};
  for (const auto& [name, mm] : std::vector<std::pair<const char*, MaskMod>>{{"causal", causal}, {"window", window}})
    for (const BlockSize& bs : {BlockSize(64), BlockSize(16)})
      for (const auto& [Q, KV] : lengths) {
        SCOPED_TRACE(fmt::format("{} BLOCK_SIZE=({}, {}) Q_LEN={} KV_LEN={}", name, bs.q, bs.kv, Q, KV));
        both(mm, 2, std::nullopt, Q, KV, bs);
      }
}

TEST_F(BlockMaskCuda, BatchAndHeadBroadcastAndNot) {
  // A mask ignoring b and h, built for B=2 H=3: evaluated once, broadcast to every plane.
  BlockMask m = both(causal, 2, 3, 384, 384, 64);
  EXPECT_EQ(m.kv_num_blocks().sizes(), (Shape{2, 3, 6}));
  // Masks that use b, h or both: every plane evaluated.
  both([](Expr b, Expr h, Expr q, Expr kv) { return (b + h) * 64 <= q - kv; }, 2, 3, 300, 260, 64);
  both([](Expr b, Expr, Expr q, Expr kv) { return (q >= kv) | (b == 1); }, 3, std::nullopt, 256, 256, 128);
  both([](Expr, Expr h, Expr q, Expr kv) { return q - kv <= h * 100; }, std::nullopt, 4, 500, 500, BlockSize(128, 64));
}

TEST_F(BlockMaskCuda, DocumentMaskReadsItsCapturedInt64OnTheDevice) {
  const int64_t S = 1000;
  std::vector<int64_t> ids(S);
  for (int64_t i = 0; i < S; ++i) ids[i] = i < 130 ? 0 : i < 420 ? 1 : i < 421 ? 2 : i < 800 ? 3 : 4;
  Tensor doc_cpu = from_vector(ids, {S}, kInt64);
  auto document = [](const Tensor& t) -> MaskMod {
    Captured doc(t, "doc");
    return [doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); };
  };
  for (BlockSize bs : {BlockSize(64), BlockSize(128), BlockSize(128, 64)}) {
    BlockMask c = create_block_mask(document(doc_cpu), std::nullopt, std::nullopt, S, S, bs);
    BlockMask d = create_block_mask(document(doc_cpu.to(dev)), std::nullopt, std::nullopt, S, S, bs, dev);
    expect_same(d, c);
  }
  // The capture must be on the mask's device.
  testing::expect_error<DeviceError>(
      [&] { create_block_mask(document(doc_cpu), std::nullopt, std::nullopt, S, S, 128, dev); }, "'doc' is on cpu");
  // An out-of-range read raises the IndexError the CPU raises (doc has S entries, Q_LEN is longer).
  EXPECT_THROW(create_block_mask(document(doc_cpu), std::nullopt, std::nullopt, S + 24, S, 128), IndexError);
  EXPECT_THROW(create_block_mask(document(doc_cpu.to(dev)), std::nullopt, std::nullopt, S + 24, S, 128, dev),
               IndexError);
}

// The classification written out here from a plain predicate (no tracing, no flexgrad evaluator): each
// row lists its blocks ascending, then the absent ones ascending.
TEST_F(BlockMaskCuda, EqualsABruteForceClassification) {
  const int64_t Q = 333, KV = 270, bq = 64, bkv = 32;
  auto allowed = [](int64_t q, int64_t kv) { return q >= kv || (q * 7 + kv * 3) % 11 == 0; };
  BlockMask d = create_block_mask(
      [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) | ((q * 7 + kv * 3) % 11 == 0); }, std::nullopt,
      std::nullopt, Q, KV, BlockSize(bq, bkv), dev);
  const int64_t nQ = (Q + bq - 1) / bq, nKV = (KV + bkv - 1) / bkv;
  std::vector<int64_t> kind(nQ * nKV);
  for (int64_t r = 0; r < nQ; ++r)
    for (int64_t c = 0; c < nKV; ++c) {
      int64_t n = 0;
      for (int64_t q = r * bq; q < std::min(Q, (r + 1) * bq); ++q)
        for (int64_t kv = c * bkv; kv < std::min(KV, (c + 1) * bkv); ++kv) n += allowed(q, kv);
      kind[r * nKV + c] = n == bq * bkv ? 2 : n > 0 ? 1 : 0;
    }
  auto lists = [&](int64_t want, bool transposed) {
    const int64_t rows = transposed ? nKV : nQ, cols = transposed ? nQ : nKV;
    std::vector<int64_t> num, idx;
    for (int64_t r = 0; r < rows; ++r) {
      auto k = [&](int64_t c) { return transposed ? kind[c * nKV + r] : kind[r * nKV + c]; };
      int64_t n = 0;
      for (int64_t c = 0; c < cols; ++c)
        if (k(c) == want) idx.push_back(c), ++n;
      for (int64_t c = 0; c < cols; ++c)
        if (k(c) != want) idx.push_back(c);
      num.push_back(n);
    }
    return std::make_pair(num, idx);
  };
  EXPECT_EQ(ints(d.block_kinds()), kind);
  EXPECT_EQ(std::make_pair(ints(d.kv_num_blocks()), ints(d.kv_indices())), lists(1, false));
  EXPECT_EQ(std::make_pair(ints(d.full_kv_num_blocks()), ints(d.full_kv_indices())), lists(2, false));
  EXPECT_EQ(std::make_pair(ints(d.q_num_blocks()), ints(d.q_indices())), lists(1, true));
  EXPECT_EQ(std::make_pair(ints(d.full_q_num_blocks()), ints(d.full_q_indices())), lists(2, true));
}

// PyTorch's create_block_mask results (the conformance files), with the masks of their README.
TEST_F(BlockMaskCuda, MatchesPyTorchConformance) {
  const std::string dir = fg::testing::conformance_dir();
  if (!std::filesystem::exists(dir + "/manifest.json"))
    GTEST_SKIP() << "no conformance data at " << dir << " (set FLEXGRAD_CONFORMANCE_DIR)";
  std::ifstream f(dir + "/manifest.json");
  nlohmann::json manifest = nlohmann::json::parse(f);
  auto case_mask = [&](const std::string& name) -> MaskMod {
    if (name == "alibi_causal" || name == "gqa_causal" || name == "learnable_relbias_table") return causal;
    if (name == "document_causal_s300") {
      Captured doc(load_npy(dir + "/document_causal_s300.cap_doc.npy").to(dev), "doc");
      return [doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); };
    }
    if (name == "sliding64_blk64") return [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 64); };
    if (name == "empty_rows") return [](Expr, Expr, Expr q, Expr kv) { return (q >= 40) & (kv <= q); };
    if (name == "prefix_lm_or") return or_masks(MaskMod(causal), MaskMod([](Expr, Expr, Expr, Expr kv) { return kv < 64; }));
    if (name == "and_window_chunk")
      return and_masks(MaskMod([](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 48; }),
                       MaskMod([](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 100) == floor_div(kv, 100); }));
    return noop_mask;
  };
  int checked = 0;
  for (const auto& c : manifest) {
    const std::string name = c["case"];
    const std::string base = dir + "/" + name + ".block_";
    if (!std::filesystem::exists(base + "kv_num.npy")) continue;
    SCOPED_TRACE(name);
    BlockSize bs = c["block"].is_array() ? BlockSize(c["block"][0].get<int64_t>(), c["block"][1].get<int64_t>())
                                         : BlockSize(c["block"].get<int64_t>());
    Tensor kv_num = load_npy(base + "kv_num.npy");
    const int64_t B = kv_num.size(0), H = kv_num.size(1);
    BlockMask m = create_block_mask(case_mask(name), B == 1 ? std::nullopt : std::optional<int64_t>(B),
                                    H == 1 ? std::nullopt : std::optional<int64_t>(H), c["Sq"].get<int64_t>(),
                                    c["Skv"].get<int64_t>(), bs, dev);
    ASSERT_EQ(m.device(), dev);
    EXPECT_EQ(m.kv_num_blocks().sizes(), kv_num.sizes());
    EXPECT_EQ(ints(m.kv_num_blocks()), ints(kv_num));
    EXPECT_EQ(ints(m.kv_indices()), ints(load_npy(base + "kv_idx.npy")));
    EXPECT_EQ(ints(m.full_kv_num_blocks()), ints(load_npy(base + "full_kv_num.npy")));
    EXPECT_EQ(ints(m.full_kv_indices()), ints(load_npy(base + "full_kv_idx.npy")));
    EXPECT_NEAR(m.sparsity(), c["sparsity"].get<double>(), 1e-9);
    ++checked;
  }
  EXPECT_GE(checked, 13);
}

TEST_F(BlockMaskCuda, EveryMethodWorksOnDeviceMasks) {
  auto mm = [](Expr b, Expr h, Expr q, Expr kv) { return (q >= kv) | ((b == 1) & (h == 0)) | (kv < 30); };
  BlockMask c = create_block_mask(mm, 2, 2, 300, 280, BlockSize(64, 32));
  BlockMask d = create_block_mask(mm, 2, 2, 300, 280, BlockSize(64, 32), dev);
  expect_same(d, c);
  auto expect_tensor = [](const Tensor& dt, const Tensor& ct) {
    EXPECT_EQ(dt.device(), dev);
    EXPECT_EQ(dt.dtype(), ct.dtype());
    EXPECT_EQ(dt.sizes(), ct.sizes());
    EXPECT_EQ(ints(dt), ints(ct));
  };
  expect_tensor(d.to_dense(), c.to_dense());
  expect_tensor(d.block_kinds(), c.block_kinds());
  EXPECT_DOUBLE_EQ(d.sparsity(), c.sparsity());
  EXPECT_EQ(d.to_string(), c.to_string());
  EXPECT_EQ(d.to_string({3, 4}, 3, true), c.to_string({3, 4}, 3, true));
  EXPECT_EQ(d.str(), c.str());
  EXPECT_EQ(d.repr(), c.repr());
  for (int64_t b : {0, 1, -1}) expect_same(d[b], c[b]);
  for (auto [b, h] : {std::pair<int64_t, int64_t>{0, 0}, {1, 0}, {-1, -1}}) expect_same(d.select(b, h), c.select(b, h));
  expect_same(d.adjust(100, 150), c.adjust(100, 150));
  expect_same(d.select(1, 1).adjust(1, 280), c.select(1, 1).adjust(1, 280));
  EXPECT_THROW(d.select(2, 0), IndexError);
  EXPECT_THROW(d.adjust(512, 64), ValueError);

  // from_kv_blocks with device tensors (int32 and int64): the mask stays on the device.
  BlockMask f = BlockMask::from_kv_blocks(d.kv_num_blocks(), d.kv_indices(), d.full_kv_num_blocks(), d.full_kv_indices(),
                                          BlockSize(64, 32), mm, std::make_pair(int64_t{300}, int64_t{280}));
  expect_same(f, c);
  BlockMask p = BlockMask::from_kv_blocks(d.kv_num_blocks().to(kInt64), d.kv_indices().to(kInt64));
  BlockMask pc = BlockMask::from_kv_blocks(c.kv_num_blocks().to(kInt64), c.kv_indices().to(kInt64));
  EXPECT_FALSE(p.has_full_blocks());
  expect_same(p, pc);
  // A block listed both partial and full keeps both entries; block_kinds calls it full.
  BlockMask both_lists = BlockMask::from_kv_blocks(d.kv_num_blocks(), d.kv_indices(), d.kv_num_blocks(), d.kv_indices());
  BlockMask both_cpu = BlockMask::from_kv_blocks(c.kv_num_blocks(), c.kv_indices(), c.kv_num_blocks(), c.kv_indices());
  expect_same(both_lists, both_cpu);
  expect_tensor(both_lists.block_kinds(), both_cpu.block_kinds());
  // Malformed device input is named; mixed devices are refused.
  Tensor bad = d.kv_indices().clone();
  bad.set_at({0, 0, 0, 0}, 99);
  testing::expect_error<IndexError>([&] { BlockMask::from_kv_blocks(d.kv_num_blocks(), bad); }, "kv_indices holds block index 99");
  testing::expect_error<DeviceError>([&] { BlockMask::from_kv_blocks(d.kv_num_blocks(), c.kv_indices()); },
                                     "expected one device");
}

// The visited-block count (visited_blocks.h) of a device mask: summed on the GPU behind its lists and copied back
// without a wait, so known once the device has passed the copy (a synchronous read of the lists, queued after it,
// waits for that); then it equals the hand count (causal at 1000 x 1000 in blocks of 128: 36 blocks a (batch,
// head), 216 over B 2 x H 3) and the CPU mask's, and sparsity() agrees with PyTorch's formula on it. Derived masks
// carry none. Past the 512 pinned slots of a device a mask gets no count (known() stays empty) and sparsity()
// reads its lists instead; slots come back when their masks die.
TEST_F(BlockMaskCuda, VisitedBlockCountComesBackWithoutWaiting) {
  BlockMask d = create_block_mask(causal, 2, 3, 1000, 1000, 128, dev);
  BlockMask f = BlockMask::from_kv_blocks(d.kv_num_blocks(), d.kv_indices(), d.full_kv_num_blocks(), d.full_kv_indices(),
                                          128, causal, std::make_pair(int64_t{1000}, int64_t{1000}));
  ASSERT_TRUE(d.visited_blocks() && f.visited_blocks());
  (void)ints(f.kv_num_blocks());  // synchronous: both counts' copies were queued before it
  EXPECT_EQ(d.visited_blocks()->known(), std::optional<int64_t>(216));
  EXPECT_EQ(f.visited_blocks()->known(), std::optional<int64_t>(216));
  EXPECT_EQ(d.visited_blocks()->known(), create_block_mask(causal, 2, 3, 1000, 1000, 128).visited_blocks()->known());
  EXPECT_DOUBLE_EQ(d.sparsity(), 100.0 * (1.0 - 216.0 * 128 * 128 / (6.0 * 1000 * 1000)));
  EXPECT_EQ(d.select(0, 0).visited_blocks(), nullptr);
  EXPECT_EQ(d.adjust(500, 500).visited_blocks(), nullptr);

  // 520 masks alive at once (causal at 256 x 256: 3 blocks each); d and f hold two slots more.
  const double sparsity3 = 100.0 * (1.0 - 3.0 * 128 * 128 / (256.0 * 256));
  std::vector<BlockMask> many;
  for (int i = 0; i < 520; ++i) many.push_back(create_block_mask(causal, std::nullopt, std::nullopt, 256, 256, 128, dev));
  (void)ints(many.back().kv_num_blocks());
  int unknown = 0;
  for (const BlockMask& m : many) {
    ASSERT_TRUE(m.visited_blocks());
    const std::optional<int64_t> n = m.visited_blocks()->known();
    if (n) {
      EXPECT_EQ(*n, 3);
    }
    unknown += n ? 0 : 1;
    EXPECT_DOUBLE_EQ(m.sparsity(), sparsity3);
  }
  EXPECT_GE(unknown, 520 + 2 - 512) << "more masks than slots, yet every one knew its count";
  EXPECT_LT(unknown, 520) << "no mask knew its count";
  many.clear();
  BlockMask again = create_block_mask(causal, std::nullopt, std::nullopt, 256, 256, 128, dev);
  (void)ints(again.kv_num_blocks());
  EXPECT_EQ(again.visited_blocks()->known(), std::optional<int64_t>(3)) << "slots are not given back";
}

#ifdef FLEXGRAD_WITH_CUDA
TEST_F(BlockMaskCuda, SecondCallCompilesNothing) {
  auto mm = [](Expr, Expr, Expr q, Expr kv) { return (q - kv) % 5 != 1; };
  create_block_mask(mm, std::nullopt, std::nullopt, 256, 256, 128, dev);
  const uint64_t compiles = cuda::jit::stats().compiles;
  create_block_mask(mm, 4, 8, 1000, 999, 64, dev);  // same program, other sizes: one module serves all
  EXPECT_EQ(cuda::jit::stats().compiles, compiles);
}
#endif

}  // namespace
}  // namespace fg
