// PagedAttention: paged flex_attention equals unpaged flex_attention (PyTorch's run_test_with_paged_attention
// pattern), the paged_decode conformance case, errors, and a randomized pool-ownership check. Every family
// runs on the CPU and on CUDA (tables, caches, masks and kernels on the GPU; skipped visibly without one);
// the golden is always the CPU's float64 flex_attention over the unpaged K/V.
#include "flexgrad/attention/paged_attention.h"

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <set>

#include "flexgrad/attention/flex_attention.h"
#include "tests/test_util.h"

namespace fg {
namespace {

using fg::testing::close;

const Device kCuda(DeviceType::CUDA, 0);
std::string device_name(const Device& d) { return d.is_cpu() ? "cpu" : "cuda"; }
#define SKIP_WITHOUT(dev)                                                                              \
  if (!(dev).is_cpu() && device_count(DeviceType::CUDA) == 0) {                                       \
    GTEST_SKIP() << "no CUDA device present: skipping the CUDA instance of this PagedAttention test"; \
  }

// ---- PyTorch's test score mods ----
Expr sm_identity(Expr s, Expr, Expr, Expr, Expr) { return s; }
Expr sm_times_two(Expr s, Expr, Expr, Expr, Expr) { return s * 2; }
Expr sm_squared(Expr s, Expr, Expr, Expr, Expr) { return s * s; }
Expr sm_causal(Expr s, Expr, Expr, Expr q, Expr kv) {
  return where(q >= kv, s, -std::numeric_limits<double>::infinity());
}
Expr sm_rel_bias(Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }
Expr sm_rel_causal(Expr s, Expr, Expr, Expr q, Expr kv) {
  return where(q >= kv, s + (q - kv), -std::numeric_limits<double>::infinity());
}
Expr sm_alibi8(Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / 8)); }

struct NamedScoreMod {
  const char* name;
  ScoreMod mod;
};
const std::vector<NamedScoreMod>& score_mods() {
  static const std::vector<NamedScoreMod> mods{{"identity", sm_identity}, {"times_two", sm_times_two},
                                               {"squared", sm_squared},   {"causal", sm_causal},
                                               {"rel_bias", sm_rel_bias}, {"rel_causal", sm_rel_causal},
                                               {"alibi8", sm_alibi8}};
  return mods;
}

double mean_abs_diff(const Tensor& a, const Tensor& b) {
  auto va = a.to(kCPU).to_vector(), vb = b.to(kCPU).to_vector();
  EXPECT_EQ(va.size(), vb.size());
  double s = 0;
  size_t n = 0;
  for (size_t i = 0; i < va.size(); ++i) {
    if (std::isinf(va[i]) && va[i] == vb[i]) continue;  // both -inf (empty rows' lse)
    s += std::abs(va[i] - vb[i]);
    ++n;
  }
  return n ? s / static_cast<double>(n) : 0.0;
}

struct Paged {
  Tensor k_cache, v_cache;
  BlockMask block_mask;
  ScoreMod score_mod;
  std::shared_ptr<PagedAttention> pa;
};

// PyTorch's preprocess_paged_attention: four reserve rounds that interleave the sequences' pages, then assign.
Paged preprocess(const ScoreMod& score_mod, const Tensor& k, const Tensor& v, const BlockMask& block_mask,
                 int64_t page_size, Device dev) {
  const int64_t B = k.size(0), H = k.size(1), S = k.size(2);
  EXPECT_EQ(B, 4);
  const int64_t n_pages = (S + page_size - 1) / page_size * B;
  Paged p;
  p.pa = std::make_shared<PagedAttention>(n_pages, page_size, B, dev);
  const std::vector<std::vector<int64_t>> rounds{{S / 4, S / 2, S / 4, S / 3},
                                                 {S / 4, S / 2, S / 2, S / 2},
                                                 {S / 2, S, S / 2, S},
                                                 {S, S, S, S}};
  for (const auto& r : rounds)
    for (int64_t b = 0; b < B; ++b) p.pa->reserve(b, r[static_cast<size_t>(b)]);
  p.k_cache = zeros({1, H, n_pages * page_size, k.size(3)}, TensorOptions().dtype(k.dtype()).device(dev));
  p.v_cache = zeros({1, H, n_pages * page_size, v.size(3)}, TensorOptions().dtype(v.dtype()).device(dev));
  Tensor pos = arange(0, static_cast<double>(S), 1, kInt32).unsqueeze(0).expand({B, S});
  p.pa->assign(arange(0, static_cast<double>(B), 1, kInt32), pos, k.to(dev), v.to(dev), p.k_cache, p.v_cache);
  p.block_mask = p.pa->convert_logical_block_mask(block_mask);
  p.score_mod = p.pa->get_score_mod(score_mod);
  return p;
}

struct Case {
  int64_t B = 4, Hq = 1, Lq = 1, E = 64, Hkv = 1, Lkv = 256, Ev = 64;
  int64_t page = 128;
  DType dtype = kFloat32;
  MaskMod mask_mod;      // empty: noop (what the CPU golden runs)
  MaskMod dev_mask_mod;  // the same rule reading device copies of its captures (empty: mask_mod)
  Device dev = kCPU;
};

// run_test_with_paged_attention: golden (float64, unpaged), reference (dtype, unpaged), paged (dtype).
void run_paged_case(const ScoreMod& score_mod, const Case& c, uint64_t seed = 0) {
  manual_seed(seed);
  Tensor q = randn({c.B, c.Hq, c.Lq, c.E}).to(c.dtype);
  Tensor k = randn({c.B, c.Hkv, c.Lkv, c.E}).to(c.dtype);
  Tensor v = randn({c.B, c.Hkv, c.Lkv, c.Ev}).to(c.dtype);
  BlockMask bm = create_block_mask(c.mask_mod ? c.mask_mod : MaskMod(noop_mask), c.B, 1, c.Lq, c.Lkv,
                                   BlockSize(c.page, c.page));
  const bool gqa = c.Hq != c.Hkv;
  FlexAttentionOptions o;
  o.score_mod = score_mod;
  o.block_mask = bm;
  o.enable_gqa = gqa;
  o.return_lse = true;
  auto golden = flex_attention(q.to(kFloat64), k.to(kFloat64), v.to(kFloat64), o);
  BlockMask dbm = c.dev.is_cpu() ? bm
                                 : create_block_mask(c.dev_mask_mod   ? c.dev_mask_mod
                                                     : c.mask_mod ? c.mask_mod
                                                                  : MaskMod(noop_mask),
                                                     c.B, 1, c.Lq, c.Lkv, BlockSize(c.page, c.page), c.dev);
  o.block_mask = dbm;
  q = q.to(c.dev), k = k.to(c.dev), v = v.to(c.dev);
  auto ref = flex_attention(q, k, v, o);

  Paged p = preprocess(score_mod, k, v, dbm, c.page, c.dev);
  FlexAttentionOptions po;
  po.score_mod = p.score_mod;
  po.block_mask = p.block_mask;
  po.enable_gqa = gqa;
  po.return_lse = true;
  auto paged = flex_attention(q, p.k_cache, p.v_cache, po);

  ASSERT_EQ(paged.out.sizes(), golden.out.sizes());
  ASSERT_EQ(paged.out.device(), c.dev);
  const double fudge = (c.dtype == kFloat32 || c.dtype == kFloat64) ? 20.0 : 1.1;
  const double ref_err = mean_abs_diff(ref.out.to(kFloat64), golden.out);
  const double paged_err = mean_abs_diff(paged.out.to(kFloat64), golden.out);
  EXPECT_LE(paged_err, (1 + fudge) * ref_err + 1e-7) << "out: paged " << paged_err << " vs unpaged " << ref_err;
  const double ref_lse = mean_abs_diff(ref.lse.to(kFloat64), golden.lse);
  const double paged_lse = mean_abs_diff(paged.lse.to(kFloat64), golden.lse);
  EXPECT_LE(paged_lse, (1 + fudge) * ref_lse + 1e-7) << "lse: paged " << paged_lse << " vs unpaged " << ref_lse;
  for (double x : paged.out.to(kCPU).to_vector()) ASSERT_FALSE(std::isnan(x));
}

// ---- every score mod x dtype (decode: Lq = 1) ----
class PagedScoreModDType : public ::testing::TestWithParam<std::tuple<int, DType, Device>> {};
TEST_P(PagedScoreModDType, MatchesUnpaged) {
  auto [mi, dt, dev] = GetParam();
  SKIP_WITHOUT(dev);
  Case c;
  c.dtype = dt;
  c.dev = dev;
  run_paged_case(score_mods()[static_cast<size_t>(mi)].mod, c, static_cast<uint64_t>(mi));
}
INSTANTIATE_TEST_SUITE_P(AllMods, PagedScoreModDType,
                         ::testing::Combine(::testing::Range(0, 7),
                                            ::testing::Values(kFloat32, kFloat64, kBFloat16, kFloat16),
                                            ::testing::Values(kCPU, kCuda)),
                         [](const auto& info) {
                           return std::string(score_mods()[static_cast<size_t>(std::get<0>(info.param))].name) + "_" +
                                  dtype_name(std::get<1>(info.param)) + "_" + device_name(std::get<2>(info.param));
                         });

// Mod index x device, named "<mod>_<device>".
class PagedModDevice : public ::testing::TestWithParam<std::tuple<int, Device>> {
 protected:
  static int mod() { return std::get<0>(GetParam()); }
  static Device dev() { return std::get<1>(GetParam()); }
};
std::string mod_device_name(const ::testing::TestParamInfo<std::tuple<int, Device>>& info) {
  return std::string(score_mods()[static_cast<size_t>(std::get<0>(info.param))].name) + "_" +
         device_name(std::get<1>(info.param));
}

// ---- Lq != Lkv, every score mod ----
class PagedDiffLen : public PagedModDevice {};
TEST_P(PagedDiffLen, MatchesUnpaged) {
  SKIP_WITHOUT(dev());
  Case c;
  c.Lq = 128;
  c.Lkv = 320;  // not a multiple of the page: the last page of each sequence is partly used
  c.dev = dev();
  run_paged_case(score_mods()[static_cast<size_t>(mod())].mod, c, 10 + static_cast<uint64_t>(mod()));
}
INSTANTIATE_TEST_SUITE_P(AllMods, PagedDiffLen, ::testing::Combine(::testing::Range(0, 7), ::testing::Values(kCPU, kCuda)),
                         mod_device_name);

// ---- GQA ----
class PagedGQA : public PagedModDevice {};
TEST_P(PagedGQA, MatchesUnpaged) {
  SKIP_WITHOUT(dev());
  Case c;
  c.Hq = 4;
  c.Hkv = 2;
  c.Lq = 16;
  c.dev = dev();
  run_paged_case(score_mods()[static_cast<size_t>(mod())].mod, c, 20 + static_cast<uint64_t>(mod()));
  // Decoding in bf16: one query token, the group packed into the split-KV kernel's tile on CUDA.
  c.Lq = 1;
  c.Hq = 8;
  c.dtype = kBFloat16;
  run_paged_case(score_mods()[static_cast<size_t>(mod())].mod, c, 25 + static_cast<uint64_t>(mod()));
}
INSTANTIATE_TEST_SUITE_P(AllMods, PagedGQA, ::testing::Combine(::testing::Range(0, 7), ::testing::Values(kCPU, kCuda)),
                         mod_device_name);

// ---- each block (page) size, with a causal block mask so the converted mask_mod runs on partial blocks ----
class PagedBlockSize : public ::testing::TestWithParam<std::tuple<int64_t, Device>> {};
TEST_P(PagedBlockSize, MatchesUnpaged) {
  const auto [page, dev] = GetParam();
  SKIP_WITHOUT(dev);
  Case c;
  c.page = page;
  c.dev = dev;
  c.Lq = 64;
  c.Lkv = 200;
  c.mask_mod = [](Expr, Expr, Expr q, Expr kv) { return q + 136 >= kv; };  // decode-style causal, offset
  run_paged_case(sm_rel_bias, c, 30 + static_cast<uint64_t>(page));
  c.mask_mod = nullptr;
  run_paged_case(sm_identity, c, 40 + static_cast<uint64_t>(page));
  c.dtype = kBFloat16;  // the tensor-core kernels (split-KV on CUDA: Lq 1)
  c.Lq = 1;
  run_paged_case(sm_alibi8, c, 50 + static_cast<uint64_t>(page));
}
INSTANTIATE_TEST_SUITE_P(Sizes, PagedBlockSize,
                         ::testing::Combine(::testing::Values(16, 32, 64, 128, 256), ::testing::Values(kCPU, kCuda)),
                         [](const auto& info) {
                           return std::to_string(std::get<0>(info.param)) + "_" + device_name(std::get<1>(info.param));
                         });

// Device-only families: TEST_P over {cpu, cuda}.
class PagedOnDevice : public ::testing::TestWithParam<Device> {
 protected:
  void SetUp() override { SKIP_WITHOUT(GetParam()); }
  static Device dev() { return GetParam(); }
};

// A mask_mod that indexes a captured tensor with kv (document mask): the wrapped mod must feed it valid logical
// indices only.
TEST_P(PagedOnDevice, CapturedMaskIndexedByKv) {
  const int64_t S = 192;
  std::vector<int64_t> doc(S);
  for (int64_t i = 0; i < S; ++i) doc[static_cast<size_t>(i)] = i < 50 ? 0 : i < 130 ? 1 : 2;
  Tensor doc_t = from_vector(doc, {S}, kInt64);
  Case c;
  c.Lq = S;
  c.Lkv = S;
  c.page = 32;
  c.mask_mod = [doc_t](Expr, Expr, Expr q, Expr kv) {
    Captured d(doc_t);
    return (Expr(d[q]) == Expr(d[kv])) & (q >= kv);
  };
  c.dev_mask_mod = [doc_d = doc_t.to(dev())](Expr, Expr, Expr q, Expr kv) {
    Captured d(doc_d);
    return (Expr(d[q]) == Expr(d[kv])) & (q >= kv);
  };
  c.dev = dev();
  run_paged_case(sm_identity, c, 7);
}

// kv_len per sequence with a noop logical mask (all blocks full): the converted mask must cut each sequence at
// its length (full blocks crossing kv_len become partial) and match the unpaged mask kv < kv_len[b].
TEST_P(PagedOnDevice, KvLenCutsFullBlocks) {
  const int64_t B = 4, H = 2, S = 256, E = 32, ps = 64;
  manual_seed(3);
  Tensor q = randn({B, H, 1, E}), k = randn({B, H, S, E}), v = randn({B, H, S, E});
  Tensor kv_len = from_vector(std::vector<int64_t>{256, 100, 17, 200}, {B}, kInt64);
  // The golden: the CPU's float64 flex_attention over the unpaged K/V, masked at kv_len.
  FlexAttentionOptions uo;
  uo.block_mask = create_block_mask([kv_len](Expr b, Expr, Expr, Expr kv) { return kv < Expr(Captured(kv_len)[b]); },
                                    B, 1, 1, S, BlockSize(1, ps));
  uo.return_lse = true;
  auto unpaged = flex_attention(q.to(kFloat64), k.to(kFloat64), v.to(kFloat64), uo);
  PagedAttention pa(S / ps * B, ps, B, dev());
  for (int64_t L : {64, 128, 256})
    for (int64_t b = 0; b < B; ++b) pa.reserve(b, L);
  const auto opts = TensorOptions().device(dev());
  Tensor kc = zeros({1, H, pa.max_cached_seq_len(), E}, opts), vc = zeros_like(kc);
  pa.assign(arange(0, B, 1, kInt64), arange(0, S, 1, kInt64).unsqueeze(0).expand({B, S}), k.to(dev()), v.to(dev()), kc,
            vc);
  // q block of 1 row: with Lq = 1 a 128-row q block sticks out past Q_LEN and can never be full (as PyTorch).
  BlockMask logical = create_block_mask(noop_mask, B, 1, 1, S, BlockSize(1, ps), dev());
  BlockMask phys = pa.convert_logical_block_mask(logical, Tensor(), kv_len.to(dev()));
  FlexAttentionOptions po;
  po.block_mask = phys;
  po.return_lse = true;
  auto paged = flex_attention(q.to(dev()), kc, vc, po);
  EXPECT_TRUE(close(paged.out.to(kCPU).to(kFloat64), unpaged.out, 1e-5, 1e-5));
  EXPECT_TRUE(close(paged.lse.to(kCPU).to(kFloat64), unpaged.lse, 1e-5, 1e-5));
  // Same through the score mod alone (no block mask).
  FlexAttentionOptions so;
  so.score_mod = pa.get_score_mod(nullptr, kv_len);
  so.return_lse = true;
  auto scored = flex_attention(q.to(dev()), kc, vc, so);
  EXPECT_TRUE(close(scored.out.to(kCPU).to(kFloat64), unpaged.out, 1e-5, 1e-5));
  // Blocks entirely past kv_len are dropped: sequence 2 (kv_len 17) visits one page.
  EXPECT_EQ(phys.kv_num_blocks().to(kCPU).at({2, 0, 0}) + phys.full_kv_num_blocks().to(kCPU).at({2, 0, 0}), 1);
  EXPECT_EQ(phys.full_kv_num_blocks().to(kCPU).at({0, 0, 0}), 4);  // 256 tokens: all four pages full
  EXPECT_EQ(phys.device(), dev());
}

// batch_idx picks slots: queries for slots 3 and 1 only, in that order.
TEST_P(PagedOnDevice, BatchIdxSelectsSlots) {
  const int64_t H = 1, S = 128, E = 16, ps = 32;
  manual_seed(5);
  Tensor k = randn({4, H, S, E}), v = randn({4, H, S, E});
  PagedAttention pa(16, ps, 4, dev());
  for (int64_t L : {32, 64, 128})
    for (int64_t b = 3; b >= 0; --b) pa.reserve(b, L);
  const auto opts = TensorOptions().device(dev());
  Tensor kc = zeros({1, H, pa.max_cached_seq_len(), E}, opts), vc = zeros_like(kc);
  pa.assign(arange(0, 4, 1, kInt64), arange(0, S, 1, kInt64).unsqueeze(0).expand({4, S}), k.to(dev()), v.to(dev()), kc,
            vc);
  Tensor slots = from_vector(std::vector<int64_t>{3, 1}, {2}, kInt64).to(dev());
  Tensor q = randn({2, H, 1, E});
  Tensor kv_len = from_vector(std::vector<int64_t>{128, 50}, {2}, kInt64).to(dev());
  BlockMask logical = create_block_mask(noop_mask, 1, 1, 1, S, BlockSize(128, ps), dev());  // B=1 broadcast
  FlexAttentionOptions po;
  po.block_mask = pa.convert_logical_block_mask(logical, slots, kv_len);
  auto paged = flex_attention(q.to(dev()), kc, vc, po);
  for (int64_t i = 0; i < 2; ++i) {
    const int64_t slot = i == 0 ? 3 : 1, len = i == 0 ? 128 : 50;
    auto ref = flex_attention(q.narrow(0, i, 1).to(kFloat64), k.narrow(0, slot, 1).narrow(2, 0, len).to(kFloat64),
                              v.narrow(0, slot, 1).narrow(2, 0, len).to(kFloat64));
    EXPECT_TRUE(close(paged.out.narrow(0, i, 1).to(kCPU).to(kFloat64), ref.out, 1e-5, 1e-5)) << "query " << i;
  }
}

// ---- the paged_decode conformance case ----
std::string conformance_dir() {
  if (const char* env = std::getenv("FLEXGRAD_CONFORMANCE_DIR")) return env;
  return FLEXGRAD_CONFORMANCE_DIR;
}

TEST_P(PagedOnDevice, ConformancePagedDecode) {
  const std::string dir = conformance_dir(), pre = dir + "/paged_decode.";
  if (!std::filesystem::exists(pre + "q.npy"))
    GTEST_SKIP() << "conformance data not present at " << dir << " (set FLEXGRAD_CONFORMANCE_DIR)";
  Tensor q = load_npy(pre + "q.npy"), k = load_npy(pre + "k.npy"), v = load_npy(pre + "v.npy");
  Tensor kv_len = load_npy(pre + "kv_len.npy");
  Tensor golden = load_npy(pre + "golden.out.npy"), glse = load_npy(pre + "golden.lse.npy");
  const int64_t B = 4, Hkv = 2, Skv = 256, D = 64, page = 64;
  ASSERT_EQ(k.sizes(), (Shape{B, Hkv, Skv, D}));
  const int64_t n_pages = (Skv / page) * (B + 2);
  PagedAttention pa(n_pages, page, B + 2, dev());
  for (const std::vector<int64_t>& L : {std::vector<int64_t>{64, 64, 64, 64}, {128, 256, 128, 64}, {256, 256, 256, 256}})
    for (int64_t b = 0; b < B; ++b) pa.reserve(b, L[static_cast<size_t>(b)]);
  // Same calls, same allocator: PyTorch's page table.
  if (std::filesystem::exists(pre + "page_table.npy")) {
    EXPECT_TRUE(close(pa.page_table().to(kCPU).to(kFloat64), load_npy(pre + "page_table.npy").to(kFloat64), 0, 0));
  }
  Tensor kc = zeros({1, Hkv, n_pages * page, D}, TensorOptions().dtype(q.dtype()).device(dev())), vc = zeros_like(kc);
  pa.assign(arange(0, B, 1, kInt32), arange(0, Skv, 1, kInt32).unsqueeze(0).expand({B, Skv}), k.to(dev()), v.to(dev()),
            kc, vc);
  Tensor len64 = kv_len.to(dev(), kInt64);
  BlockMask ref_bm = create_block_mask([len64](Expr b, Expr, Expr, Expr kv) { return kv < Expr(Captured(len64)[b]); },
                                       B, 1, 1, Skv, BlockSize(128, page), dev());
  FlexAttentionOptions o;
  o.block_mask = pa.convert_logical_block_mask(ref_bm, Tensor(), kv_len.to(dev()));
  o.enable_gqa = true;
  o.return_lse = true;
  auto r = flex_attention(q.to(dev()), kc, vc, o);
  const double err = mean_abs_diff(r.out.to(kFloat64), golden.to(kFloat64));
  const double bound = 21 * 3.6e-8 + 1e-7;
  EXPECT_LE(err, bound) << "paged_decode out mean abs error";
  for (double x : r.lse.to(kCPU).to_vector()) EXPECT_TRUE(std::isfinite(x));
  EXPECT_LE(mean_abs_diff(r.lse.to(kFloat64), glse.to(kFloat64)), 1e-5);
  std::printf("[paged_decode %s] out mean abs err %.3g (bound %.3g)\n", device_name(dev()).c_str(), err, bound);
}

// ---- errors ----
TEST(PagedAttentionErrors, ReserveAndErase) {
  EXPECT_THROW_MSG(PagedAttention(0, 16, 2), ValueError, "n_pages");
  PagedAttention pa(4, 16, 2);
  EXPECT_THROW_MSG(pa.reserve(2, 10), IndexError, "batch_idx 2", "max_batch_size");
  EXPECT_THROW_MSG(pa.reserve(-1, 10), IndexError, "batch_idx -1");
  EXPECT_THROW_MSG(pa.reserve(0, -3), ValueError, "seq_len", "-3");
  // A length whose page count overflows when rounded up used to reach std::vector with a negative size.
  EXPECT_THROW_MSG(pa.reserve(0, std::numeric_limits<int64_t>::max()), ValueError, "batch_idx 0",
                   "576460752303423488 more page", "4 of 4 pages are free");
  EXPECT_EQ(pa.capacity(0), 0);
  pa.reserve(0, 40);  // 3 pages
  EXPECT_EQ(pa.capacity(0), 48);
  pa.reserve(0, 48);  // no-op
  EXPECT_EQ(pa.pages_in_use(), 3);
  Tensor table = pa.page_table().clone(), p2l = pa.physical_to_logical().clone();
  auto free_before = pa.empty_pages();
  EXPECT_THROW_MSG(pa.reserve(1, 20), ValueError, "batch_idx 1", "2 more page", "1 of 4 pages are free");
  // Nothing changed by the failed reserve.
  EXPECT_TRUE(close(pa.page_table(), table, 0, 0));
  EXPECT_TRUE(close(pa.physical_to_logical(), p2l, 0, 0));
  EXPECT_EQ(pa.empty_pages(), free_before);
  EXPECT_EQ(pa.capacity(1), 0);
  EXPECT_THROW_MSG(pa.erase(5), IndexError, "batch_idx 5");
  pa.erase(0);
  EXPECT_EQ(pa.pages_in_use(), 0);
  EXPECT_EQ(pa.capacity(0), 0);
  pa.reserve(1, 64);  // the whole pool again
  EXPECT_EQ(pa.pages_in_use(), 4);
}

TEST_P(PagedOnDevice, AssignErrorsWriteNothing) {
  PagedAttention pa(8, 4, 2, dev());
  pa.reserve(0, 8);
  const int64_t L = pa.max_cached_seq_len();
  const auto opts = TensorOptions().device(dev());
  Tensor kc = zeros({1, 2, L, 3}, opts), vc = zeros({1, 2, L, 5}, opts);
  Tensor kv = ones({1, 2, 2, 3}, opts), vv = ones({1, 2, 2, 5}, opts);
  Tensor slot0 = from_vector(std::vector<int64_t>{0}, {1}, kInt64);
  auto pos = [](int64_t a, int64_t b) { return from_vector(std::vector<int64_t>{a, b}, {1, 2}, kInt64); };
  auto untouched = [&] { return kc.sum().item<double>() == 0 && vc.sum().item<double>() == 0; };
  // Position 8 is past the reserved capacity (8): nothing written, not even position 0.
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 8), kv, vv, kc, vc), IndexError, "input_pos[0, 1] = 8", "capacity 8");
  EXPECT_THROW_MSG(pa.assign(slot0, pos(-1, 0), kv, vv, kc, vc), IndexError, "= -1");
  EXPECT_THROW_MSG(pa.assign(from_vector(std::vector<int64_t>{1}, {1}, kInt64), pos(0, 1), kv, vv, kc, vc), IndexError,
                   "batch_idx 1", "capacity 0");
  EXPECT_THROW_MSG(pa.assign(from_vector(std::vector<int64_t>{3}, {1}, kInt64), pos(0, 1), kv, vv, kc, vc), IndexError,
                   "batch_idx[0] = 3");
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), kv.to(kFloat64), vv, kc, vc), DTypeError, "k_val float64",
                   "k_cache float32");
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), kv, ones({1, 2, 2, 4}, opts), kc, vc), ShapeError, "v_cache",
                   "[1, 2, 32, 4]");
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), ones({1, 3, 2, 3}, opts), ones({1, 3, 2, 5}, opts), kc, vc), ShapeError,
                   "k_cache");
  EXPECT_THROW_MSG(pa.assign(slot0, from_vector(std::vector<int64_t>{0}, {1, 1}, kInt64), kv, vv, kc, vc), ShapeError,
                   "input_pos has shape [1, 1]");
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), kv, vv, zeros({1, 2, L - 1, 3}, opts), vc), ShapeError, "k_cache");
  if (!dev().is_cpu()) {
    EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), kv.to(kCPU), vv, kc, vc), DeviceError, "k_val", "cpu");
  }
  EXPECT_THROW_MSG(pa.assign(from_vector(std::vector<double>{0}, {1}, kFloat32), pos(0, 1), kv, vv, kc, vc),
                   DTypeError, "batch_idx", "integer");
  Tensor grad_k = ones({1, 2, 2, 3}, opts).requires_grad_();
  EXPECT_THROW_MSG(pa.assign(slot0, pos(0, 1), grad_k, vv, kc, vc), ValueError, "require grad");
  EXPECT_TRUE(untouched());
  pa.assign(slot0, pos(6, 7), kv, vv, kc, vc);
  EXPECT_FALSE(untouched());
  // Position 6 of slot 0 is row 2 of its second page: the values landed there.
  const int64_t row = pa.pages_of(0)[1] * 4 + 2;
  EXPECT_EQ(kc.to(kCPU).at({0, 1, row, 2}), 1.0);
  // convert: kv block size must be the page size.
  BlockMask bm = create_block_mask(noop_mask, 1, 1, 1, 8, BlockSize(128, 8), dev());
  EXPECT_THROW_MSG(pa.convert_logical_block_mask(bm), ValueError, "kv block size 8", "page_size 4");
  if (!dev().is_cpu()) {
    // A logical mask on the CPU is accepted (its lists are uploaded) and converts exactly as the same mask built
    // on the device; the result lives on the tables' device.
    BlockMask a = pa.convert_logical_block_mask(create_block_mask(noop_mask, 1, 1, 1, 8, BlockSize(128, 4)));
    BlockMask b = pa.convert_logical_block_mask(create_block_mask(noop_mask, 1, 1, 1, 8, BlockSize(128, 4), dev()));
    EXPECT_EQ(a.device(), dev());
    EXPECT_TRUE(equal(a.kv_num_blocks().to(kCPU), b.kv_num_blocks().to(kCPU)));
    EXPECT_TRUE(equal(a.kv_indices().to(kCPU), b.kv_indices().to(kCPU)));
    EXPECT_TRUE(equal(a.full_kv_num_blocks().to(kCPU), b.full_kv_num_blocks().to(kCPU)));
    EXPECT_TRUE(equal(a.full_kv_indices().to(kCPU), b.full_kv_indices().to(kCPU)));
    EXPECT_GT(a.full_kv_num_blocks().to(kCPU).at({0, 0, 0}) + a.kv_num_blocks().to(kCPU).at({0, 0, 0}), 0);
  }
  BlockMask bm4 = create_block_mask(noop_mask, 2, 1, 1, 8, BlockSize(128, 4), dev());
  EXPECT_THROW_MSG(pa.convert_logical_block_mask(bm4, from_vector(std::vector<int64_t>{0, 1, 0}, {3}, kInt64)),
                   ShapeError, "batch_idx has 3 entries");
  EXPECT_THROW_MSG(pa.convert_logical_block_mask(bm4, Tensor(), from_vector(std::vector<int64_t>{1}, {1}, kInt64)),
                   ShapeError, "kv_len has 1 entries");
}

// ---- randomized reserve / erase / assign against a model of the pool ----
TEST_P(PagedOnDevice, RandomizedAgainstModel) {
  const int64_t n_pages = 24, ps = 4, max_b = 5, H = 1, D = 2;
  PagedAttention pa(n_pages, ps, max_b, dev());
  std::vector<std::vector<int64_t>> owned(max_b);  // model: pages of each slot in logical order
  std::map<std::pair<int64_t, int64_t>, double> written;  // (slot, logical pos) -> value written there
  const auto opts = TensorOptions().device(dev());
  Tensor kc = zeros({1, H, n_pages * ps, D}, opts), vc = zeros({1, H, n_pages * ps, D}, opts);
  std::mt19937 rng(1234);
  auto check_invariants = [&] {
    // The device tables as the kernels see them (read back once per check).
    const Tensor table = pa.page_table().to(kCPU), p2l = pa.physical_to_logical().to(kCPU);
    const Tensor capacity = pa.capacity().to(kCPU);
    std::set<int64_t> seen;
    int64_t owned_total = 0;
    for (int64_t b = 0; b < max_b; ++b) {
      auto pages = pa.pages_of(b);
      ASSERT_EQ(pages.size(), owned[static_cast<size_t>(b)].size()) << "slot " << b;
      ASSERT_EQ(pa.capacity(b), static_cast<int64_t>(pages.size()) * ps);
      ASSERT_EQ(capacity.at({b}), static_cast<double>(pa.capacity(b)));
      for (size_t i = 0; i < pages.size(); ++i) {
        ASSERT_TRUE(seen.insert(pages[i]).second) << "page " << pages[i] << " owned twice";
        ASSERT_EQ(p2l.at({b, pages[i]}), static_cast<double>(i));
        ASSERT_EQ(table.at({b, static_cast<int64_t>(i)}), static_cast<double>(pages[i]));
        ++owned_total;
      }
      for (int64_t i = static_cast<int64_t>(pages.size()); i < n_pages; ++i) ASSERT_EQ(table.at({b, i}), -1);
      int64_t mapped = 0;
      for (int64_t p = 0; p < n_pages; ++p) mapped += p2l.at({b, p}) >= 0;
      ASSERT_EQ(mapped, static_cast<int64_t>(pages.size()));
    }
    for (int64_t p : pa.empty_pages()) ASSERT_TRUE(seen.insert(p).second) << "page " << p << " free and owned/dup";
    ASSERT_EQ(static_cast<int64_t>(seen.size()), n_pages) << "a page was lost";
    ASSERT_EQ(pa.pages_in_use(), owned_total);
  };
  double next_value = 1;
  for (int step = 0; step < 3000; ++step) {
    const int64_t b = static_cast<int64_t>(rng() % max_b);
    const int op = static_cast<int>(rng() % 10);
    if (op < 5) {
      const int64_t len = static_cast<int64_t>(rng() % 70);
      const int64_t cap = static_cast<int64_t>(owned[static_cast<size_t>(b)].size()) * ps;
      const int64_t need = len > cap ? (len - cap + ps - 1) / ps : 0;
      const int64_t free_n = n_pages - pa.pages_in_use();
      if (need > free_n) {
        EXPECT_THROW(pa.reserve(b, len), ValueError);
      } else {
        pa.reserve(b, len);
        auto pages = pa.pages_of(b);
        // Existing pages keep their places; new ones appended.
        for (size_t i = 0; i < owned[static_cast<size_t>(b)].size(); ++i)
          ASSERT_EQ(pages[i], owned[static_cast<size_t>(b)][i]);
        owned[static_cast<size_t>(b)] = pages;
        ASSERT_EQ(static_cast<int64_t>(pages.size()), std::max(cap / ps, (len + ps - 1) / ps));
      }
    } else if (op < 7) {
      pa.erase(b);
      owned[static_cast<size_t>(b)].clear();
      for (auto it = written.begin(); it != written.end();) it = it->first.first == b ? written.erase(it) : std::next(it);
    } else {
      const int64_t cap = static_cast<int64_t>(owned[static_cast<size_t>(b)].size()) * ps;
      const int64_t p = static_cast<int64_t>(rng() % static_cast<uint32_t>(cap + 3));  // sometimes past capacity
      Tensor kv = full({1, H, 1, D}, next_value).to(dev()), vv = full({1, H, 1, D}, -next_value).to(dev());
      Tensor pos = from_vector(std::vector<int64_t>{p}, {1, 1}, kInt64);
      Tensor slot = from_vector(std::vector<int64_t>{b}, {1}, kInt64);
      if (p >= cap) {
        EXPECT_THROW(pa.assign(slot, pos, kv, vv, kc, vc), IndexError);
      } else {
        pa.assign(slot, pos, kv, vv, kc, vc);
        written[{b, p}] = next_value;
        next_value += 1;
      }
    }
    check_invariants();
    if (::testing::Test::HasFatalFailure()) return;
    // Everything written to live slots reads back at its physical place.
    if (step % 50 == 0) {
      const Tensor kh = kc.to(kCPU), vh = vc.to(kCPU);
      for (const auto& [key, val] : written) {
        const auto& pages = owned[static_cast<size_t>(key.first)];
        const int64_t row = pages[static_cast<size_t>(key.second / ps)] * ps + key.second % ps;
        // Another slot may have reused and overwritten a page only after this slot erased it.
        ASSERT_EQ(kh.at({0, 0, row, 1}), val);
        ASSERT_EQ(vh.at({0, 0, row, 0}), -val);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Devices, PagedOnDevice, ::testing::Values(kCPU, kCuda),
                         [](const auto& info) { return device_name(info.param); });

}  // namespace
}  // namespace fg
