// The mask / score-mod gallery (attention/gallery): every constructor against its definition written out
// here as plain C++ (../shared/gallery/README.md), the tables the constructors build against PyTorch's
// (the cap_* files of ../shared/gallery), the registry's errors, and the whole gallery data set through the
// conformance harness (PyTorch's rule, BlockMasks identical to PyTorch's) in float32 and bfloat16.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <functional>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/batchify.h"
#include "flexgrad/attention/gallery/block_diffusion.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/document.h"
#include "flexgrad/attention/gallery/graphormer.h"
#include "flexgrad/attention/gallery/natten.h"
#include "flexgrad/attention/gallery/registry.h"
#include "flexgrad/attention/gallery/sandwich.h"
#include "flexgrad/attention/gallery/sliding_window.h"
#include "flexgrad/attention/gallery/softcap.h"
#include "flexgrad/attention/mod_program.h"
#include "flexgrad/tensor/npy.h"
#include "tests/test_util.h"
#include "tools/conformance/conformance.h"

namespace fg {
namespace {

using Rule = std::function<bool(int64_t q, int64_t kv)>;

// Every (q, kv) of an S x S mask against the plain rule; reports the first difference.
::testing::AssertionResult same_mask(const MaskMod& mask, int64_t S, const Rule& rule) {
  ModProgram p = trace_mask_mod(mask);
  for (int64_t q = 0; q < S; ++q)
    for (int64_t kv = 0; kv < S; ++kv) {
      const bool got = p.evaluate(0, 0, q, kv) != 0, want = rule(q, kv);
      if (got != want) return ::testing::AssertionFailure() << "(q, kv) = (" << q << ", " << kv << "): " << got << " vs " << want;
    }
  return ::testing::AssertionSuccess();
}

int64_t iabs(int64_t x) { return x < 0 ? -x : x; }

TEST(Gallery, CausalPrefixAndSlidingWindowsFollowTheirDefinitions) {
  EXPECT_TRUE(same_mask(causal_mask(), 40, [](int64_t q, int64_t kv) { return q >= kv; }));
  EXPECT_TRUE(same_mask(prefix_lm_mask(7), 40, [](int64_t q, int64_t kv) { return kv < 7 || q >= kv; }));
  EXPECT_TRUE(same_mask(sliding_window_mask(5), 40, [](int64_t q, int64_t kv) { return q >= kv && q - kv <= 5; }));
  EXPECT_TRUE(same_mask(dilated_sliding_window_mask(9, 3), 40,
                        [](int64_t q, int64_t kv) { return iabs(q - kv) <= 9 && iabs(q - kv) % 3 == 0; }));
  std::vector<int64_t> global_at{0, 17, 39};
  Tensor g = zeros({40}, kBool);
  for (int64_t i : global_at) g.set_at({i}, 1);
  EXPECT_TRUE(same_mask(global_sliding_window_mask(4, g), 40, [&](int64_t q, int64_t kv) {
    auto is_g = [&](int64_t i) { return std::find(global_at.begin(), global_at.end(), i) != global_at.end(); };
    return iabs(q - kv) <= 4 || is_g(q) || is_g(kv);
  }));
}

TEST(Gallery, DocumentMasksBuildTheirDocumentIds) {
  // Five documents, one of them empty: lengths 3, 0, 6, 1, 5.
  Tensor offsets = length_to_offsets({3, 0, 6, 1, 5});
  EXPECT_EQ(offsets.to_vector(), (std::vector<double>{0, 3, 3, 9, 10, 15}));
  const std::vector<int64_t> o{0, 3, 3, 9, 10, 15};
  auto doc = [&](int64_t i) {
    int64_t d = 0;
    while (o[static_cast<size_t>(d) + 1] <= i) ++d;
    return d;
  };
  std::vector<double> ids;
  for (int64_t i = 0; i < 15; ++i) ids.push_back(static_cast<double>(doc(i)));
  EXPECT_EQ(offsets_to_document_ids(offsets).to_vector(), ids);

  DocumentMask dm = document_mask(offsets, sliding_window_mask(2));
  EXPECT_EQ(dm.document_id.to_vector(), ids);
  EXPECT_TRUE(same_mask(dm, 15, [&](int64_t q, int64_t kv) {
    const int64_t lq = q - o[static_cast<size_t>(doc(q))], lkv = kv - o[static_cast<size_t>(doc(kv))];
    return doc(q) == doc(kv) && lq >= lkv && lq - lkv <= 2;
  }));
  EXPECT_TRUE(same_mask(packed_causal_document_mask(offsets), 15, [&](int64_t q, int64_t kv) {
    return kv >= o[static_cast<size_t>(doc(q))] && q >= kv;
  }));
  // Documents 0 and 3 are prompts; 2 continues 0, 4 continues 3; 1 (empty) maps to itself.
  const std::vector<int64_t> prefix{0, 1, 0, 3, 3};
  Tensor p = from_vector(prefix, {5}, kInt64);
  EXPECT_TRUE(same_mask(shared_prefix_mask(offsets, p), 15, [&](int64_t q, int64_t kv) {
    const int64_t d = doc(q), pd = prefix[static_cast<size_t>(d)];
    return (kv >= o[static_cast<size_t>(d)] && q >= kv) ||
           (d != pd && kv >= o[static_cast<size_t>(pd)] && kv < o[static_cast<size_t>(pd) + 1]);
  }));
  EXPECT_TRUE(same_mask(batchify_mask(6, causal_mask()), 30,
                        [](int64_t q, int64_t kv) { return q / 6 == kv / 6 && q % 6 >= kv % 6; }));
}

// x = the even bits of i, y = the odd bits, by bit operations (the library uses // and %).
std::pair<int64_t, int64_t> morton(int64_t i) {
  int64_t x = 0, y = 0;
  for (int k = 0; k < 16; ++k) {
    x |= ((i >> (2 * k)) & 1) << k;
    y |= ((i >> (2 * k + 1)) & 1) << k;
  }
  return {x, y};
}

TEST(Gallery, NattenInItsThreeOrderings) {
  const int64_t W = 8, H = 8, KW = 3, KH = 5;
  auto window = [&](std::pair<int64_t, int64_t> q, std::pair<int64_t, int64_t> kv) {
    const int64_t cx = std::clamp(q.first, KW / 2, W - 1 - KW / 2), cy = std::clamp(q.second, KH / 2, H - 1 - KH / 2);
    return iabs(cx - kv.first) <= KW / 2 && iabs(cy - kv.second) <= KH / 2;
  };
  auto row_major = [&](int64_t i) { return std::pair<int64_t, int64_t>{i / W, i % W}; };
  EXPECT_TRUE(same_mask(natten_mask({W, H, KW, KH}), W * H,
                        [&](int64_t q, int64_t kv) { return window(row_major(q), row_major(kv)); }));
  const int64_t TW = 4, TH = 2;
  auto tiled = [&](int64_t i) {
    const int64_t t = i / (TH * TW), o = i % (TH * TW);
    return std::pair<int64_t, int64_t>{(t % (W / TW)) * TW + o % TW, (t / (W / TW)) * TH + o / TW};
  };
  EXPECT_TRUE(same_mask(tiled_natten_mask({W, H, KW, KH}, TW, TH), W * H,
                        [&](int64_t q, int64_t kv) { return window(tiled(q), tiled(kv)); }));
  EXPECT_TRUE(same_mask(morton_natten_mask({W, H, KW, KH}), W * H,
                        [&](int64_t q, int64_t kv) { return window(morton(q), morton(kv)); }));
  // The decoding itself, up to the 32-bit indices the README defines it for.
  ModProgram x = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return morton_compact(q, 0) == kv; });
  ModProgram y = trace_mask_mod([](Expr, Expr, Expr q, Expr kv) { return morton_compact(q, 1) == kv; });
  for (int64_t i : {int64_t{0}, int64_t{1}, int64_t{2}, int64_t{3}, int64_t{1023}, int64_t{123456789}, int64_t{4294967295}}) {
    EXPECT_EQ(x.evaluate(0, 0, i, morton(i).first), 1) << i;
    EXPECT_EQ(y.evaluate(0, 0, i, morton(i).second), 1) << i;
  }
}

TEST(Gallery, BlockDiffusionFollowsItsDefinition) {
  const int64_t S = 24, bs = 8;
  EXPECT_TRUE(same_mask(block_diffusion_mask(S, bs), 2 * S, [&](int64_t q, int64_t kv) {
    const bool qn = q < S, kn = kv < S;
    const int64_t qb = (q % S) / bs, kb = (kv % S) / bs;
    return (qb == kb && qn == kn) || (qb > kb && qn && !kn) || (qb >= kb && !qn && !kn);
  }));
}

// score_mod(score) at every (b, h, q, kv) against the plain formula.
::testing::AssertionResult same_score(const ScoreMod& mod, int64_t B, int64_t H, int64_t S,
                                      const std::function<double(double, int64_t, int64_t, int64_t, int64_t)>& f,
                                      double tol) {
  ModProgram p = trace_score_mod(mod);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t q = 0; q < S; ++q)
        for (int64_t kv = 0; kv < S; ++kv) {
          const double s = 0.25 * static_cast<double>((q * 7 + kv * 3) % 11) - 1.0;
          const double got = p.evaluate(b, h, q, kv, s), want = f(s, b, h, q, kv);
          if (!(std::abs(got - want) <= tol))
            return ::testing::AssertionFailure() << "(b, h, q, kv) = (" << b << ", " << h << ", " << q << ", " << kv
                                                 << "): " << got << " vs " << want;
        }
  return ::testing::AssertionSuccess();
}

TEST(Gallery, ScoreModsFollowTheirDefinitions) {
  EXPECT_TRUE(same_score(alibi_score_mod(8), 1, 8, 12, [](double s, int64_t, int64_t h, int64_t q, int64_t kv) {
    return s + static_cast<double>(kv - q) * std::pow(2.0, -8.0 * static_cast<double>(h + 1) / 8.0);
  }, 1e-12));
  EXPECT_TRUE(same_score(tanh_softcap_score_mod(3.0), 1, 1, 12,
                         [](double s, int64_t, int64_t, int64_t, int64_t) { return 3.0 * std::tanh(s / 3.0); }, 1e-12));
  // Sandwich: the tables in float64 here; the library's float32 tables agree to float32 rounding.
  const int64_t H = 3, M = 10, d_bar = 16;
  SandwichBias sw = sandwich_score_mod(H, M, d_bar);
  ASSERT_EQ(sw.rel_bias.sizes(), (Shape{24}));  // 2 * 10 - 1 = 19, up to a multiple of 8
  auto rel = [&](int64_t j) {
    double acc = 0;
    for (int64_t i = 0; i < d_bar / 2; ++i)
      acc += std::cos(static_cast<double>(iabs(j - (M - 1))) * std::pow(10000.0, -2.0 * static_cast<double>(i) / d_bar));
    return acc;
  };
  for (int64_t j = 0; j < 24; ++j) EXPECT_NEAR(sw.rel_bias.at({j}), rel(j), 1e-5) << j;
  EXPECT_TRUE(same_score(sw, 1, H, M, [&](double s, int64_t, int64_t h, int64_t q, int64_t kv) {
    return s + rel(q - kv + M - 1) * static_cast<double>(H) / (8.0 * static_cast<double>(h + 1));
  }, 1e-5));
}

TEST(Gallery, GraphormerDistancesAndBias) {
  // A path 0-1-2-3, node 4 alone, and a one-way edge 4 -> 0 in the second graph.
  Tensor adj = zeros({2, 5, 5}, kBool);
  for (int64_t b = 0; b < 2; ++b)
    for (auto [i, j] : std::vector<std::pair<int64_t, int64_t>>{{0, 1}, {1, 2}, {2, 3}}) {
      adj.set_at({b, i, j}, 1);
      adj.set_at({b, j, i}, 1);
    }
  adj.set_at({1, 4, 0}, 1);
  const int64_t unreachable = 5;  // max(N = 5, max_distance + 1 = 3), then clamped to 3
  Tensor d = shortest_path_distances(adj, 2);
  ASSERT_EQ(d.dtype(), kInt32);
  for (int64_t b = 0; b < 2; ++b)
    for (int64_t i = 0; i < 5; ++i)
      for (int64_t j = 0; j < 5; ++j) {
        int64_t want = i == j ? 0 : (i < 4 && j < 4) ? iabs(i - j) : unreachable;
        if (b == 1 && i == 4 && j < 4) want = 1 + j;  // 4 -> 0 -> ... -> j
        EXPECT_EQ(d.at({b, i, j}), static_cast<double>(std::min<int64_t>(want, 3))) << b << " " << i << " " << j;
      }
  Tensor table = from_vector(std::vector<float>{0.5f, -1.f, 2.f, 0.25f, 3.f, -2.f, 1.5f, 0.75f}, {2, 4}, kFloat32);
  GraphormerSpatialBias g = graphormer_spatial_score_mod(table, adj, 2);
  EXPECT_TRUE(same_score(g, 2, 2, 5, [&](double s, int64_t b, int64_t h, int64_t q, int64_t kv) {
    return s + table.at({h, static_cast<int64_t>(d.at({b, q, kv}))});
  }, 1e-12));
}

TEST(Gallery, ConstructorsRejectBadParameters) {
  EXPECT_THROW_MSG(sliding_window_mask(-1), ValueError, "window must be >= 0, got -1");
  EXPECT_THROW_MSG(dilated_sliding_window_mask(4, 0), ValueError, "dilation must be >= 1, got 0");
  EXPECT_THROW_MSG(global_sliding_window_mask(4, zeros({8}, kInt64)), DTypeError, "is_global must be bool");
  EXPECT_THROW_MSG(document_mask(from_vector(std::vector<int64_t>{1, 5}, {2}, kInt64), causal_mask()), ValueError,
                   "offsets must start at 0, got offsets[0] = 1");
  EXPECT_THROW_MSG(packed_causal_document_mask(from_vector(std::vector<int64_t>{0, 5, 3}, {3}, kInt64)), ValueError,
                   "non-decreasing", "offsets[2] = 3");
  EXPECT_THROW_MSG(length_to_offsets({3, -1}), ValueError, "lengths[1] must be >= 0, got -1");
  EXPECT_THROW_MSG(shared_prefix_mask(length_to_offsets({2, 2}), from_vector(std::vector<int64_t>{0, 2}, {2}, kInt64)),
                   ValueError, "prefix_document_id[1] = 2 is not a document in [0, 2)");
  EXPECT_THROW_MSG(natten_mask({8, 8, 9, 3}), ValueError, "kernel_w must be in [1, canvas_w = 8], got 9");
  EXPECT_THROW_MSG(tiled_natten_mask({8, 8, 3, 3}, 3, 4), ValueError, "tiles 3 x 4 must divide the canvas 8 x 8");
  EXPECT_THROW_MSG(batchify_mask(0, causal_mask()), ValueError, "n must be >= 1, got 0");
  EXPECT_THROW_MSG(block_diffusion_mask(16, 0), ValueError, "block_size must be >= 1, got 0");
  EXPECT_THROW_MSG(tanh_softcap_score_mod(0), ValueError, "cap must be finite and > 0");
  EXPECT_THROW_MSG(sandwich_score_mod(4, 16, 1), ValueError, "d_bar must be >= 2, got 1");
  EXPECT_THROW_MSG(shortest_path_distances(zeros({2, 3, 4}, kBool), 2), ShapeError, "[B, N, N], got [2, 3, 4]");
  EXPECT_THROW_MSG(graphormer_spatial_score_mod(zeros({4, 3}), zeros({1, 3, 3}, kBool), 2), ShapeError,
                   "max_distance + 2 = 4");
}

TEST(GalleryRegistry, BuildsByNameAndRejectsWhatItCannotUse) {
  GallerySpec inner{"sliding_window", "", {{"window", int64_t{2}}}};
  GallerySpec doc{"document", "", {{"offsets", length_to_offsets({3, 4})},
                                   {"inner", std::make_shared<const GallerySpec>(inner)}}};
  GalleryMods m = build_gallery_mods(doc);
  ASSERT_TRUE(static_cast<bool>(m.mask_mod));
  EXPECT_FALSE(static_cast<bool>(m.score_mod));
  EXPECT_EQ(m.tables.at("doc").to_vector(), (std::vector<double>{0, 0, 0, 1, 1, 1, 1}));
  EXPECT_EQ(m.description, "document(offsets=int64[0, 3, 7], inner=sliding_window(window=2))");
  EXPECT_TRUE(same_mask(m.mask_mod, 7, [](int64_t q, int64_t kv) {
    return (q < 3) == (kv < 3) && q >= kv && q - kv <= 2;
  }));
  GalleryMods both = build_gallery_mods({"causal", "sandwich", {{"heads", int64_t{2}}, {"max_seq_len", int64_t{8}},
                                                                {"d_bar", int64_t{8}}}});
  EXPECT_TRUE(static_cast<bool>(both.mask_mod) && static_cast<bool>(both.score_mod));
  EXPECT_EQ(both.tables.count("rel_bias") + both.tables.count("head_scale"), 2u);
  EXPECT_EQ(gallery_entries().size(), 17u);

  EXPECT_THROW_MSG(build_gallery_mods({"nosuch", "", {}}), ValueError, "unknown mask 'nosuch'", "natten");
  EXPECT_THROW_MSG(build_gallery_mods({"sandwich", "", {}}), ValueError, "'sandwich' is a score_mod, not a mask_mod");
  EXPECT_THROW_MSG(build_gallery_mods({"sliding_window", "", {}}), ValueError,
                   "sliding_window needs parameter 'window' (int");
  EXPECT_THROW_MSG(build_gallery_mods({"sliding_window", "", {{"window", 2.5}}}), ValueError,
                   "parameter 'window' must be an integer, got 2.5");
  EXPECT_THROW_MSG(build_gallery_mods({"causal", "", {{"window", int64_t{2}}}}), ValueError,
                   "causal has no parameter 'window' (its parameters: none)");
  EXPECT_THROW_MSG(build_gallery_mods({"batchify", "", {{"n", int64_t{4}}, {"inner", int64_t{1}}}}), ValueError,
                   "parameter 'inner' must be a mask");
  EXPECT_THROW_MSG(build_gallery_mods({}), ValueError, "names neither a mask nor a score");
}

// ---- against PyTorch's data (../shared/gallery): skipped visibly without it.
std::string gallery_file(const std::string& c, const std::string& what) { return fg::testing::gallery_dir() + "/" + c + "." + what + ".npy"; }

#define REQUIRE_GALLERY_DATA()                                                          \
  if (!std::filesystem::exists(fg::testing::gallery_dir() + "/manifest.json"))          \
  GTEST_SKIP() << "no gallery data at " << fg::testing::gallery_dir()

TEST(GalleryTables, DocumentIdsDistancesAndSandwichTablesEqualPyTorchs) {
  REQUIRE_GALLERY_DATA();
  for (const char* c : {"doc_inner_sliding", "packed_causal_doc", "shared_prefix"}) {
    Tensor ids = offsets_to_document_ids(load_npy(gallery_file(c, "cap_offsets")));
    Tensor theirs = load_npy(gallery_file(c, "cap_doc"));
    EXPECT_EQ(ids.dtype(), theirs.dtype()) << c;
    EXPECT_TRUE(equal(ids, theirs)) << c;
  }
  // graphormer_spatial's mod: max_distance 5 (manifest); the adjacency is PyTorch's, the distances ours.
  Tensor dist = shortest_path_distances(load_npy(gallery_file("graphormer_spatial", "cap_adj")), 5);
  Tensor theirs = load_npy(gallery_file("graphormer_spatial", "cap_dist"));
  EXPECT_EQ(dist.dtype(), theirs.dtype());
  EXPECT_TRUE(equal(dist, theirs));
  // sandwich_causal_dbar128's mod: heads 4, max_seq_len 256, d_bar 128. head_scale is exact; rel_bias (sums
  // of 64 float32 cosines up to 64) within one float32 ulp of the largest entry (2^-17 at 64).
  SandwichBias sw = sandwich_score_mod(4, 256, 128);
  EXPECT_TRUE(equal(sw.head_scale, load_npy(gallery_file("sandwich_causal_dbar128", "cap_head_scale"))));
  Tensor rb = load_npy(gallery_file("sandwich_causal_dbar128", "cap_rel_bias"));
  ASSERT_EQ(sw.rel_bias.sizes(), rb.sizes());
  EXPECT_LE(max(abs(sw.rel_bias.to(kFloat64) - rb.to(kFloat64))).item(), std::ldexp(1.0, -17));
}

class GalleryConformance : public ::testing::TestWithParam<std::pair<DType, FlexBackend>> {};

TEST_P(GalleryConformance, EveryCasePassesPyTorchsRuleWithPyTorchsBlockMask) {
  REQUIRE_GALLERY_DATA();
  ConformanceOptions o;
  o.dtype = GetParam().first;
  o.backend = GetParam().second;
  auto results = run_conformance(fg::testing::gallery_dir(), o);
  EXPECT_EQ(results.size(), 12u);
  for (const auto& r : results) {
    EXPECT_TRUE(r.passed()) << format_conformance({r});
    EXPECT_EQ(r.checks.at(0).tensor, "block_mask");
  }
  std::printf("%s", format_conformance(results).c_str());
}

INSTANTIATE_TEST_SUITE_P(FusedAndReference, GalleryConformance,
                         ::testing::Values(std::pair{kFloat32, FlexBackend::Fused}, std::pair{kBFloat16, FlexBackend::Fused},
                                           std::pair{kFloat32, FlexBackend::Reference}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.first)) +
                                  (info.param.second == FlexBackend::Reference ? "_reference" : "_fused");
                         });

// The table rows can fail: PyTorch's document ids with one position moved to the next document.
TEST(GalleryConformance, ATableUnlikeTheConstructorsFailsItsRow) {
  REQUIRE_GALLERY_DATA();
  namespace fs = std::filesystem;
  const fs::path tmp = fg::testing::scratch_path("gallery_wrong_table");
  fs::create_directories(tmp);
  const std::string c = "packed_causal_doc";
  for (const auto& entry : fs::directory_iterator(fg::testing::gallery_dir()))
    if (entry.path().filename().string().rfind(c + ".", 0) == 0) fs::copy_file(entry.path(), tmp / entry.path().filename());
  Tensor doc = load_npy(gallery_file(c, "cap_doc")).clone();
  doc.set_at({36}, 1);  // the last position of document 0
  save_npy((tmp / (c + ".cap_doc.npy")).string(), doc);
  // Generous PyTorch errors: only the table row is meant to fail.
  std::ofstream(tmp / "manifest.json")
      << R"([{"case": "packed_causal_doc", "block": 128, "mod": {"mask": "packed_causal_document", "offsets": "cap_offsets"},
             "errors": {"fp32_ref": {"out": 1, "lse": 1, "dq": 1, "dk": 1, "dv": 1}}}])";
  auto results = run_conformance(tmp.string());
  ASSERT_EQ(results.size(), 1u);
  EXPECT_FALSE(results[0].passed());
  for (const auto& chk : results[0].checks) {
    if (chk.tensor == "cap_doc") {
      EXPECT_FALSE(chk.passed);
      EXPECT_EQ(chk.err_impl, 1.0);
    } else {
      EXPECT_TRUE(chk.passed) << chk.tensor;
    }
  }
}

TEST(GalleryConformance, AManifestModIsCheckedBeforeAnyCaseRuns) {
  namespace fs = std::filesystem;
  const fs::path tmp = fg::testing::scratch_path("gallery_bad_mod");
  fs::create_directories(tmp);
  auto write = [&](const std::string& mod) {
    std::ofstream(tmp / "manifest.json") << R"([{"case": "c", "block": 128, "errors": {}, "mod": )" << mod << "}]";
  };
  write(R"({"mask": "nosuch"})");
  EXPECT_THROW_MSG(run_conformance(tmp.string()), ValueError, "case 'c' (entry 0): field \"mod\"",
                   "\"nosuch\" is not a gallery mask constructor");
  write(R"({"mask": "global_sliding_window", "window": 4, "is_global": "cap_is_global"})");
  EXPECT_THROW_MSG(run_conformance(tmp.string()), ValueError, "c.cap_is_global.npy, which does not exist");
  write(R"({"mask": "batchify", "n": 4, "inner": {"score": "alibi"}})");
  EXPECT_THROW_MSG(run_conformance(tmp.string()), ValueError, "\"inner\": must name a \"mask\" and no \"score\"");
  write(R"({"window": 4})");
  EXPECT_THROW_MSG(run_conformance(tmp.string()), ValueError, "names neither a \"mask\" nor a \"score\"");
}

}  // namespace
}  // namespace fg
