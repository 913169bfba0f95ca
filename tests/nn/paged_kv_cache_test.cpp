// PagedKVCache, once per device (CPU, CUDA): a GPT decoding through the paged page pool (PagedAttention)
// gives the contiguous cache's logits and tokens — GQA, batch 2, prompts longer than a page, decoding across
// several pages, chunked prefill under a mask, a score_mod — plus pool exhaustion, reset and argument
// errors; rows of different lengths (ragged appends, reset_row and reuse of the freed pages) against a
// float64 per-row attention written in the test.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

#include "flexgrad/nn/nn.h"
#include "tests/nn/nn_devices.h"

namespace fg::testing {
namespace {

using namespace fg::nn;

constexpr int64_t kPage = 8;

// vocab 13, context 64, 2 layers, 4 query heads over 2 kv heads (head_dim 4).
std::shared_ptr<GPT> small_gqa_gpt(Device dev = kCPU) {
  manual_seed(11);
  GPTConfig gc{.vocab_size = 13, .context = 64, .d_model = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2};
  auto gpt = std::make_shared<GPT>(gc);
  gpt->to(dev);
  gpt->eval();
  return gpt;
}

class PagedKVCacheTest : public NnDeviceTest {
 protected:
  // The GPU kernels sum in another order than the CPU's; both paths compute in float32.
  double atol() const { return on_cuda() ? 1e-4 : 1e-5; }
  double rtol() const { return on_cuda() ? 1e-3 : 1e-4; }
  Tensor tokens(int64_t B, int64_t L, uint64_t seed) const;
};

struct Caches {
  std::vector<std::unique_ptr<KVCache>> owned;
  std::vector<KVCache*> ptrs;
};

Caches make_caches(const GPT& gpt, const KVCacheFactory& f, int64_t batch) {
  Caches c;
  const auto& attn = *(*gpt.blocks)[0]->attn;
  for (size_t i = 0; i < gpt.blocks->size(); ++i) {
    c.owned.push_back(f(static_cast<int64_t>(i), batch, attn.config.n_kv_heads, gpt.config.context, attn.head_dim,
                        gpt.tok_emb->weight.options()));
    c.ptrs.push_back(c.owned.back().get());
  }
  return c;
}

Tensor random_tokens(int64_t B, int64_t L, uint64_t seed) {
  Generator g(seed);
  return randint(0, 13, {B, L}, kInt64, &g);
}
Tensor PagedKVCacheTest::tokens(int64_t B, int64_t L, uint64_t seed) const { return random_tokens(B, L, seed).to(dev()); }

TEST_P(PagedKVCacheTest, DecodeMatchesContiguousAcrossPages) {
  auto gpt = small_gqa_gpt(dev());
  NoGradGuard ng;
  const int64_t B = 2, P = 11, steps = 30;  // prompt over 1 page; 41 tokens end on the 6th page
  Tensor idx = tokens(B, P + steps, 5);
  Caches cont = make_caches(*gpt, contiguous_kv_cache_factory(), B);
  Caches paged = make_caches(*gpt, paged_kv_cache_factory(kPage), B);
  AttentionCall pre;
  pre.block_mask = causal_block_mask(P);  // 64-wide kv blocks: the paged cache rebuilds it with pages
  Tensor a = gpt->forward(narrow(idx, 1, 0, P), pre, cont.ptrs);
  Tensor b = gpt->forward(narrow(idx, 1, 0, P), pre, paged.ptrs);
  EXPECT_TRUE(close(b, a, atol(), rtol()));
  std::vector<Tensor> la{a}, lb{b};
  for (int64_t t = P; t < P + steps; ++t) {
    Tensor x = narrow(idx, 1, t, 1);
    la.push_back(gpt->forward(x, {}, cont.ptrs));
    lb.push_back(gpt->forward(x, {}, paged.ptrs));
    ASSERT_TRUE(close(lb.back(), la.back(), atol(), rtol())) << "step " << t;
  }
  // Both equal the uncached forward of the whole sequence.
  AttentionCall full;
  full.block_mask = causal_block_mask(P + steps);
  Tensor ref = gpt->forward(idx, full);
  EXPECT_TRUE(close(cat(lb, 1), ref, atol(), rtol()));
  auto& pc = static_cast<PagedKVCache&>(*paged.owned[0]);
  EXPECT_EQ(pc.length(), P + steps);
  EXPECT_EQ(pc.pages_in_use(), B * 6);
  EXPECT_EQ(pc.n_pages(), B * 8);  // auto: every row at the full context of 64
  // The rows own disjoint pages, interleaved in the pool as they grew (not one contiguous run per row).
  std::vector<int64_t> p0 = pc.paged().pages_of(0), p1 = pc.paged().pages_of(1);
  ASSERT_EQ(p0.size(), 6u);
  ASSERT_EQ(p1.size(), 6u);
  for (int64_t p : p0) EXPECT_EQ(std::count(p1.begin(), p1.end(), p), 0) << "page " << p;
  EXPECT_NE(p0, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
}

TEST_P(PagedKVCacheTest, ChunkedPrefillWithMaskAndScoreMod) {
  auto gpt = small_gqa_gpt(dev());
  NoGradGuard ng;
  const int64_t B = 2;
  Tensor idx = tokens(B, 29, 6);
  // A score_mod that reads the (logical) kv index: a wrong page mapping would change the result.
  ScoreMod bias = [](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + 0.05 * kv - 0.02 * h + 0.01 * q; };
  for (const bool with_score : {false, true}) {
    Caches cont = make_caches(*gpt, contiguous_kv_cache_factory(), B);
    Caches paged = make_caches(*gpt, paged_kv_cache_factory(kPage, 12), B);
    auto run = [&](Caches& c) {
      std::vector<Tensor> out;
      int64_t pos = 0;
      for (int64_t chunk : {13, 7, 1, 8}) {
        AttentionCall call;
        if (with_score) call.score_mod = bias;
        // Causal in absolute positions: the new queries start at `pos`. Blocks of page size (no rebuild).
        call.block_mask = create_block_mask([pos](Expr, Expr, Expr q, Expr kv) { return q + pos >= kv; }, std::nullopt,
                                            std::nullopt, chunk, pos + chunk, BlockSize(16, kPage));
        out.push_back(gpt->forward(narrow(idx, 1, pos, chunk), call, c.ptrs));
        pos += chunk;
      }
      return cat(out, 1);
    };
    Tensor a = run(cont), b = run(paged);
    EXPECT_TRUE(close(b, a, atol(), rtol())) << "score_mod " << with_score;
  }
}

TEST_P(PagedKVCacheTest, GenerateMatchesContiguous) {
  auto gpt = small_gqa_gpt(dev());
  const int64_t P = 11;
  Tensor prompt = tokens(2, P, 7);
  // 70 new tokens run past the context of 64: the caches restart (reset) on the way.
  Tensor ref = gpt->generate(prompt, 70, {.temperature = 0, .top_k = 0, .generator = nullptr, .cache_factory = {}});
  Tensor paged = gpt->generate(prompt, 70, {.temperature = 0, .cache_factory = paged_kv_cache_factory(kPage)});
  EXPECT_EQ(paged.sizes(), (Shape{2, P + 70}));
  EXPECT_TRUE(equal(paged, ref));
  // A pool smaller than the worst case is enough while the rows fit in it.
  Tensor small = gpt->generate(prompt, 30, {.temperature = 0, .cache_factory = paged_kv_cache_factory(kPage, 12)});
  EXPECT_TRUE(equal(small, narrow(ref, 1, 0, P + 30)));
  // Batched generation decodes each row as it would alone.
  for (int64_t b = 0; b < 2; ++b) {
    Tensor alone = gpt->generate(narrow(prompt, 0, b, 1), 20, {.temperature = 0, .cache_factory = paged_kv_cache_factory(kPage)});
    EXPECT_TRUE(equal(alone, narrow(narrow(ref, 0, b, 1), 1, 0, P + 20))) << "row " << b;
  }
  // Sampling with the same generator draws the same tokens.
  Generator g1(3), g2(3);
  Tensor s1 = gpt->generate(prompt, 25, {.temperature = 0.9, .top_k = 5, .generator = &g1, .cache_factory = {}});
  Tensor s2 = gpt->generate(prompt, 25,
                            {.temperature = 0.9, .top_k = 5, .generator = &g2, .cache_factory = paged_kv_cache_factory(4)});
  EXPECT_TRUE(equal(s1, s2));
}

TEST_P(PagedKVCacheTest, PoolExhaustionIsAClearErrorAndChangesNothing) {
  NoGradGuard ng;
  PagedKVCache c(2, 2, 64, 4, kPage, 5, dev());
  Tensor k = randn({2, 2, 9, 4}).to(dev()), v = randn({2, 2, 9, 4}).to(dev());
  c.append(k, v);  // 2 pages per row: 4 of 5
  EXPECT_EQ(c.pages_in_use(), 4);
  Tensor k1 = randn({2, 2, 8, 4}).to(dev());
  EXPECT_THROW_MSG(c.append(k1, k1), ValueError, "PagedKVCache.append: page pool exhausted", "from 9 to 17 tokens",
                   "need 2 more page(s) of 8", "only 1 of 5 pages are free");
  EXPECT_EQ(c.length(), 9);
  EXPECT_EQ(c.pages_in_use(), 4);
  // Still usable: the next token fits in the reserved pages.
  Tensor k2 = randn({2, 2, 1, 4}).to(dev());
  c.append(k2, k2);
  EXPECT_EQ(c.length(), 10);
  // Through generate: a pool too small for the prompt.
  auto gpt = small_gqa_gpt(dev());
  EXPECT_THROW_MSG(gpt->generate(tokens(2, 11, 8), 3, {.temperature = 0, .cache_factory = paged_kv_cache_factory(kPage, 3)}),
                   ValueError, "page pool exhausted", "need 4 more page(s)", "only 3 of 3");
}

TEST_P(PagedKVCacheTest, ResetFreesPagesAndAttendsAfresh) {
  NoGradGuard ng;
  Generator g(9);
  PagedKVCache c(2, 2, 40, 4, kPage, 0, dev());
  EXPECT_EQ(c.n_pages(), 10);
  Tensor k = randn({2, 2, 20, 4}, kFloat32, &g).to(dev()), v = randn({2, 2, 20, 4}, kFloat32, &g).to(dev());
  Tensor q = randn({2, 4, 3, 4}, kFloat32, &g).to(dev());
  FlexAttentionOptions o;
  o.enable_gqa = true;
  c.append(k, v);
  EXPECT_EQ(c.pages_in_use(), 6);
  c.reset();
  EXPECT_EQ(c.length(), 0);
  EXPECT_EQ(c.pages_in_use(), 0);
  EXPECT_EQ(c.paged().pages_of(0).size(), 0u);
  // Reused pages come back in another order; results do not depend on it.
  Tensor k2 = narrow(k, 2, 0, 17), v2 = narrow(v, 2, 0, 17);
  c.append(k2, v2);
  EXPECT_EQ(c.pages_in_use(), 6);
  ContiguousKVCache ref(2, 2, 40, 4, dev());
  ref.append(k2, v2);
  EXPECT_TRUE(close(c.attend(q, o).out, ref.attend(q, o).out, atol() / 10, rtol() / 10));
  EXPECT_TRUE(close(c.attend(q, o).out, flex_attention(q, ref.keys().contiguous(), ref.values().contiguous(), o).out,
                    atol() / 10, rtol() / 10));
}

TEST_P(PagedKVCacheTest, Errors) {
  NoGradGuard ng;
  EXPECT_THROW_MSG(PagedKVCache(2, 2, 0, 4, 8), ValueError, "PagedKVCache: sizes must be positive", "max_len 0");
  EXPECT_THROW_MSG(PagedKVCache(2, 2, 16, 4, 8, -1), ValueError, "n_pages must be >= 0", "got -1");
  EXPECT_THROW_MSG(paged_kv_cache_factory(0), ValueError, "page_size must be positive");
  PagedKVCache c(2, 2, 16, 4, 8, 0, dev());
  Tensor q = randn({2, 4, 1, 4}).to(dev());
  FlexAttentionOptions o;
  o.enable_gqa = true;
  EXPECT_THROW_MSG(c.attend(q, o), ValueError, "PagedKVCache.attend: q has 1 queries but 0 tokens are cached");
  EXPECT_THROW_MSG(c.append(randn({1, 2, 3, 4}).to(dev()), randn({1, 2, 3, 4}).to(dev())), ShapeError,
                   "PagedKVCache.append: k [1, 2, 3, 4] does not match the cache [2, 2, *, 4]");
  EXPECT_THROW_MSG(c.append(randn({2, 2, 3, 4}).to(dev()), randn({2, 2, 2, 4}).to(dev())), ShapeError, "k and v must be [B, Hkv, L, E]");
  EXPECT_THROW_MSG(c.append(randn({2, 2, 17, 4}).to(dev()), randn({2, 2, 17, 4}).to(dev())), IndexError,
                   "0 cached + 17 new tokens exceed capacity 16");
  c.append(randn({2, 2, 5, 4}).to(dev()), randn({2, 2, 5, 4}).to(dev()));
  o.block_mask = create_block_mask(noop_mask, std::nullopt, std::nullopt, 1, 4, 8);
  EXPECT_THROW_MSG(c.attend(q, o), ShapeError, "created for (Q_LEN, KV_LEN) = (1, 4)", "1 queries over 5 cached");
  o.block_mask.reset();
  EXPECT_THROW_MSG(c.attend(randn({2, 4, 1, 3}).to(dev()), o), ShapeError, "q [2, 4, 1, 3] does not match the cache");
}

// ---- Rows of different lengths. The golden: each row alone, in float64 on the CPU, written out here.

// Row b's logical keys / values so far, [Hkv][t][E] flattened per token: what the test appended.
struct RowStore {
  std::vector<std::vector<std::vector<double>>> k, v;  // [row][token] -> Hkv * E values
};

// Records what a ragged append keeps: row b the first keep[b] of the L given tokens.
void record(RowStore& st, const Tensor& k, const Tensor& v, const std::vector<int64_t>& keep) {
  const int64_t B = k.size(0), H = k.size(1), L = k.size(2), E = k.size(3);
  const std::vector<double> kv = k.to(kCPU).to_vector(), vv = v.to(kCPU).to_vector();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < keep[static_cast<size_t>(b)]; ++t) {
      std::vector<double> kt, vt;
      for (int64_t h = 0; h < H; ++h)
        for (int64_t e = 0; e < E; ++e) {
          kt.push_back(kv[static_cast<size_t>(((b * H + h) * L + t) * E + e)]);
          vt.push_back(vv[static_cast<size_t>(((b * H + h) * L + t) * E + e)]);
        }
      st.k[static_cast<size_t>(b)].push_back(kt);
      st.v[static_cast<size_t>(b)].push_back(vt);
    }
}

// Appends to both the cache (ragged) and the store.
void append_both(PagedKVCache& c, RowStore& st, const Tensor& k, const Tensor& v, const std::vector<int64_t>& keep) {
  c.append(k, v, keep);
  record(st, k, v, keep);
}

// softmax(q.k / sqrt(E) + score(b, h, i, j)) over row b's tokens j where mask(b, h, i, j); 0 where none is.
using Score64 = std::function<double(int64_t b, int64_t h, int64_t i, int64_t j)>;
using Mask64 = std::function<bool(int64_t b, int64_t h, int64_t i, int64_t j)>;
std::vector<double> per_row_golden(const Tensor& q, const RowStore& st, int64_t Hkv, const Score64& score,
                                   const Mask64& mask) {
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), E = q.size(3), G = Hq / Hkv;
  const std::vector<double> qv = q.to(kCPU).to_vector();
  std::vector<double> out(static_cast<size_t>(B * Hq * Lq * E), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hq; ++h)
      for (int64_t i = 0; i < Lq; ++i) {
        const auto& keys = st.k[static_cast<size_t>(b)];
        const auto& vals = st.v[static_cast<size_t>(b)];
        std::vector<double> s(keys.size(), -std::numeric_limits<double>::infinity());
        double mx = -std::numeric_limits<double>::infinity();
        for (size_t j = 0; j < keys.size(); ++j) {
          if (!mask(b, h, i, static_cast<int64_t>(j))) continue;
          double dot = 0;
          for (int64_t e = 0; e < E; ++e)
            dot += qv[static_cast<size_t>(((b * Hq + h) * Lq + i) * E + e)] * keys[j][static_cast<size_t>((h / G) * E + e)];
          s[j] = dot / std::sqrt(static_cast<double>(E)) + score(b, h, i, static_cast<int64_t>(j));
          mx = std::max(mx, s[j]);
        }
        if (std::isinf(mx)) continue;  // nothing attendable: zeros
        double den = 0;
        std::vector<double> acc(static_cast<size_t>(E), 0.0);
        for (size_t j = 0; j < keys.size(); ++j) {
          if (std::isinf(s[j])) continue;
          const double p = std::exp(s[j] - mx);
          den += p;
          for (int64_t e = 0; e < E; ++e) acc[static_cast<size_t>(e)] += p * vals[j][static_cast<size_t>((h / G) * E + e)];
        }
        for (int64_t e = 0; e < E; ++e)
          out[static_cast<size_t>(((b * Hq + h) * Lq + i) * E + e)] = acc[static_cast<size_t>(e)] / den;
      }
  return out;
}

::testing::AssertionResult matches(const Tensor& got, const std::vector<double>& want, double atol) {
  const std::vector<double> g = got.to(kCPU).to_vector();
  if (g.size() != want.size()) return ::testing::AssertionFailure() << g.size() << " values vs " << want.size();
  for (size_t i = 0; i < g.size(); ++i)
    if (!(std::abs(g[i] - want[i]) <= atol)) return ::testing::AssertionFailure() << "element " << i << ": " << g[i] << " vs " << want[i];
  return ::testing::AssertionSuccess();
}

TEST_P(PagedKVCacheTest, RaggedRowsAttendEachToItsOwnLength) {
  NoGradGuard ng;
  Generator g(21);
  const int64_t B = 3, Hkv = 2, Hq = 4, E = 4;
  PagedKVCache c(B, Hkv, 40, E, kPage, 0, dev());
  RowStore st{std::vector<std::vector<std::vector<double>>>(B), std::vector<std::vector<std::vector<double>>>(B)};
  auto kv = [&](int64_t L) { return randn({B, Hkv, L, E}, kFloat32, &g).to(dev()); };
  append_both(c, st, kv(13), kv(13), {13, 5, 0});  // a ragged prefill, row 2 still empty
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{13, 5, 0}));
  EXPECT_EQ(c.length(), 13);  // the longest row
  EXPECT_EQ(c.pages_in_use(), 2 + 1);
  Tensor k1 = kv(1), v1 = kv(1);
  c.append(k1, v1);  // the KVCache interface: one token after each row's own
  record(st, k1, v1, {1, 1, 1});
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{14, 6, 1}));
  append_both(c, st, kv(9), kv(9), {0, 9, 4});
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{14, 15, 5}));
  EXPECT_EQ(c.length(), 15);
  EXPECT_EQ(c.length(1), 15);
  EXPECT_EQ(c.pages_in_use(), 2 + 2 + 1);
  for (int64_t b = 0; b < B; ++b)
    EXPECT_EQ(static_cast<int64_t>(c.paged().pages_of(b).size()), (c.length(b) + kPage - 1) / kPage) << "row " << b;

  const int64_t Lq = 2;
  Tensor q = randn({B, Hq, Lq, E}, kFloat32, &g).to(dev());
  FlexAttentionOptions o;
  o.enable_gqa = true;
  auto none = [](int64_t, int64_t, int64_t, int64_t) { return 0.0; };
  auto all = [](int64_t, int64_t, int64_t, int64_t) { return true; };
  EXPECT_TRUE(matches(c.attend(q, o).out, per_row_golden(q, st, Hkv, none, all), 2e-5)) << "no mask";
  // A score_mod reading the logical kv index, the head and the query: a wrong page or length shows.
  o.score_mod = [](Expr s, Expr, Expr h, Expr qi, Expr kvi) { return s + 0.07 * kvi - 0.03 * h + 0.02 * qi; };
  auto bias = [](int64_t, int64_t h, int64_t i, int64_t j) { return 0.07 * double(j) - 0.03 * double(h) + 0.02 * double(i); };
  EXPECT_TRUE(matches(c.attend(q, o).out, per_row_golden(q, st, Hkv, bias, all), 2e-5)) << "score_mod";
  // A block_mask over (Lq, longest row), built on the CPU, of page-size kv blocks (moved to the cache's
  // device) and of 16-wide ones (rebuilt with pages); each row still stops at its own length.
  MaskMod m = [](Expr, Expr, Expr qi, Expr kvi) { return (kvi % 3 != 1) | (qi == 0); };
  auto m64 = [](int64_t, int64_t, int64_t i, int64_t j) { return j % 3 != 1 || i == 0; };
  for (int64_t bkv : {kPage, int64_t{16}}) {
    o.block_mask = create_block_mask(m, std::nullopt, std::nullopt, Lq, c.length(), BlockSize(Lq, bkv));
    EXPECT_TRUE(matches(c.attend(q, o).out, per_row_golden(q, st, Hkv, bias, m64), 2e-5)) << "kv block " << bkv;
  }
}

TEST_P(PagedKVCacheTest, ResetRowFreesItsPagesForANewSequence) {
  NoGradGuard ng;
  Generator g(22);
  const int64_t B = 3, Hkv = 1, E = 8;
  PagedKVCache c(B, Hkv, 32, E, kPage, 9, dev());  // 9 pages: not every row can be full at once
  RowStore st{std::vector<std::vector<std::vector<double>>>(B), std::vector<std::vector<std::vector<double>>>(B)};
  auto kv = [&](int64_t L) { return randn({B, Hkv, L, E}, kFloat32, &g).to(dev()); };
  append_both(c, st, kv(20), kv(20), {20, 17, 3});  // 3 + 3 + 1 pages
  EXPECT_EQ(c.pages_in_use(), 7);
  // Rows 0, 1 and 2 growing by 9, 9 and 6 tokens need a page each; only 2 are free.
  Tensor k9 = kv(9);
  EXPECT_THROW_MSG(c.append(k9, k9, {9, 9, 6}), ValueError, "page pool exhausted", "need 3 more page(s) of 8",
                   "only 2 of 9 pages are free");
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{20, 17, 3}));
  EXPECT_EQ(c.pages_in_use(), 7);
  // Row 1's sequence finishes: its pages go back, the other rows keep theirs.
  const std::vector<int64_t> freed = c.paged().pages_of(1), kept0 = c.paged().pages_of(0);
  c.reset_row(1);
  st.k[1].clear();
  st.v[1].clear();
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{20, 0, 3}));
  EXPECT_EQ(c.pages_in_use(), 4);
  EXPECT_EQ(c.paged().pages_of(0), kept0);
  EXPECT_TRUE(c.paged().pages_of(1).empty());
  // A new sequence takes the slot and the freed pages (last freed, first reused).
  append_both(c, st, kv(22), kv(22), {0, 22, 0});
  std::vector<int64_t> now = c.paged().pages_of(1);
  ASSERT_EQ(now.size(), 3u);
  for (int64_t p : now) EXPECT_EQ(std::count(freed.begin(), freed.end(), p), 1) << "page " << p;
  EXPECT_EQ(c.pages_in_use(), 7);
  // Decode one token on every row; an emptied row attends to nothing (zeros).
  append_both(c, st, kv(1), kv(1), {1, 1, 1});
  c.reset_row(2);
  st.k[2].clear();
  st.v[2].clear();
  Tensor q = randn({B, 2, 1, E}, kFloat32, &g).to(dev());
  FlexAttentionOptions o;
  o.enable_gqa = true;
  auto none = [](int64_t, int64_t, int64_t, int64_t) { return 0.0; };
  auto all = [](int64_t, int64_t, int64_t, int64_t) { return true; };
  EXPECT_TRUE(matches(c.attend(q, o).out, per_row_golden(q, st, Hkv, none, all), 2e-5));
  // reset() gives everything back.
  c.reset();
  EXPECT_EQ(c.pages_in_use(), 0);
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{0, 0, 0}));
}

// Decoding in bfloat16 (on CUDA: flex_attention's split-KV kernel, GQA group of 4, head dim 64) over rows of
// very different lengths, one of them sitting a step out; the golden uses the bfloat16-rounded inputs.
TEST_P(PagedKVCacheTest, RaggedDecodeInBFloat16) {
  NoGradGuard ng;
  Generator g(23);
  const int64_t B = 4, Hkv = 2, Hq = 8, E = 64, page = 16;
  PagedKVCache c(B, Hkv, 160, E, page, 0, TensorOptions(kBFloat16).device(dev()));
  RowStore st{std::vector<std::vector<std::vector<double>>>(B), std::vector<std::vector<std::vector<double>>>(B)};
  auto kv = [&](int64_t L) { return randn({B, Hkv, L, E}, kFloat32, &g).to(kBFloat16).to(dev()); };
  append_both(c, st, kv(90), kv(90), {37, 0, 90, 5});
  for (int step = 0; step < 3; ++step) append_both(c, st, kv(1), kv(1), {1, step == 1 ? 0 : 1, 1, 1});
  EXPECT_EQ(c.lengths(), (std::vector<int64_t>{40, 2, 93, 8}));
  Tensor q = randn({B, Hq, 1, E}, kFloat32, &g).to(kBFloat16).to(dev());
  FlexAttentionOptions o;
  o.enable_gqa = true;
  o.score_mod = [](Expr s, Expr, Expr h, Expr, Expr kvi) { return s - 0.01 * kvi + 0.1 * h; };
  auto bias = [](int64_t, int64_t h, int64_t, int64_t j) { return -0.01 * double(j) + 0.1 * double(h); };
  auto all = [](int64_t, int64_t, int64_t, int64_t) { return true; };
  FlexAttentionResult r = c.attend(q, o);
  EXPECT_EQ(r.out.dtype(), kBFloat16);
  // bfloat16 keeps 8 bits: outputs of magnitude <= ~1 round by <= 2^-8, plus the kernel's bf16 products.
  EXPECT_TRUE(matches(r.out, per_row_golden(q, st, Hkv, bias, all), 2e-2));
}

TEST_P(PagedKVCacheTest, RaggedAppendErrorsChangeNothing) {
  NoGradGuard ng;
  PagedKVCache c(2, 2, 16, 4, kPage, 0, dev());
  Tensor k = randn({2, 2, 7, 4}).to(dev());
  c.append(k, k, {7, 3});
  auto unchanged = [&] {
    EXPECT_EQ(c.lengths(), (std::vector<int64_t>{7, 3}));
    EXPECT_EQ(c.pages_in_use(), 2);
  };
  EXPECT_THROW_MSG(c.append(k, k, {7}), ShapeError, "new_tokens has 1 entries, expected one per row (2)");
  unchanged();
  EXPECT_THROW_MSG(c.append(k, k, {1, 8}), ValueError, "new_tokens[1] = 8 is outside [0, 7]");
  EXPECT_THROW_MSG(c.append(k, k, {-1, 0}), ValueError, "new_tokens[0] = -1 is outside [0, 7]");
  unchanged();
  Tensor k10 = randn({2, 2, 10, 4}).to(dev());
  EXPECT_THROW_MSG(c.append(k10, k10, {10, 0}), IndexError, "row 0: 7 cached + 10 new tokens exceed capacity 16");
  EXPECT_THROW_MSG(c.append(k10, k10), IndexError, "row 0: 7 cached + 10 new tokens exceed capacity 16");
  unchanged();
  EXPECT_THROW_MSG(c.reset_row(2), IndexError, "PagedKVCache.reset_row: row 2 out of range [0, 2)");
  EXPECT_THROW_MSG(c.reset_row(-1), IndexError, "row -1 out of range");
  EXPECT_THROW_MSG(c.length(5), IndexError, "PagedKVCache.length: row 5 out of range [0, 2)");
  unchanged();
  if (on_cuda()) {
    Tensor host = randn({2, 2, 1, 4});
    EXPECT_THROW_MSG(c.append(host, host), DeviceError, "k and v must be on the cache's device");
    EXPECT_THROW_MSG(c.attend(randn({2, 4, 1, 4}), {}), DeviceError, "PagedKVCache.attend: q is on");
    unchanged();
  }
}

FG_NN_INSTANTIATE_DEVICES(PagedKVCacheTest);

}  // namespace
}  // namespace fg::testing
