// PagedKVCache: a GPT decoding through the paged page pool (PagedAttention) gives the contiguous cache's
// logits and tokens — GQA, batch 2, prompts longer than a page, decoding across several pages, chunked
// prefill under a mask, a score_mod — plus pool exhaustion, reset and argument errors.
#include <algorithm>

#include "flexgrad/nn/nn.h"
#include "tests/test_util.h"

namespace fg::testing {
namespace {

using namespace fg::nn;

constexpr int64_t kPage = 8;

// vocab 13, context 64, 2 layers, 4 query heads over 2 kv heads (head_dim 4).
std::shared_ptr<GPT> small_gqa_gpt() {
  manual_seed(11);
  GPTConfig gc{.vocab_size = 13, .context = 64, .d_model = 16, .n_layers = 2, .n_heads = 4, .n_kv_heads = 2};
  auto gpt = std::make_shared<GPT>(gc);
  gpt->eval();
  return gpt;
}

struct Caches {
  std::vector<std::unique_ptr<KVCache>> owned;
  std::vector<KVCache*> ptrs;
};

Caches make_caches(const GPT& gpt, const KVCacheFactory& f, int64_t batch) {
  Caches c;
  const auto& attn = *(*gpt.blocks)[0]->attn;
  for (size_t i = 0; i < gpt.blocks->size(); ++i) {
    c.owned.push_back(f(static_cast<int64_t>(i), batch, attn.config.n_kv_heads, gpt.config.context, attn.head_dim, {}));
    c.ptrs.push_back(c.owned.back().get());
  }
  return c;
}

Tensor random_tokens(int64_t B, int64_t L, uint64_t seed) {
  Generator g(seed);
  return randint(0, 13, {B, L}, kInt64, &g);
}

TEST(PagedKVCache, DecodeMatchesContiguousAcrossPages) {
  auto gpt = small_gqa_gpt();
  NoGradGuard ng;
  const int64_t B = 2, P = 11, steps = 30;  // prompt over 1 page; 41 tokens end on the 6th page
  Tensor idx = random_tokens(B, P + steps, 5);
  Caches cont = make_caches(*gpt, contiguous_kv_cache_factory(), B);
  Caches paged = make_caches(*gpt, paged_kv_cache_factory(kPage), B);
  AttentionCall pre;
  pre.block_mask = causal_block_mask(P);  // 64-wide kv blocks: the paged cache rebuilds it with pages
  Tensor a = gpt->forward(narrow(idx, 1, 0, P), pre, cont.ptrs);
  Tensor b = gpt->forward(narrow(idx, 1, 0, P), pre, paged.ptrs);
  EXPECT_TRUE(close(b, a, 1e-5, 1e-4));
  std::vector<Tensor> la{a}, lb{b};
  for (int64_t t = P; t < P + steps; ++t) {
    Tensor x = narrow(idx, 1, t, 1);
    la.push_back(gpt->forward(x, {}, cont.ptrs));
    lb.push_back(gpt->forward(x, {}, paged.ptrs));
    ASSERT_TRUE(close(lb.back(), la.back(), 1e-5, 1e-4)) << "step " << t;
  }
  // Both equal the uncached forward of the whole sequence.
  AttentionCall full;
  full.block_mask = causal_block_mask(P + steps);
  Tensor ref = gpt->forward(idx, full);
  EXPECT_TRUE(close(cat(lb, 1), ref, 1e-5, 1e-4));
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

TEST(PagedKVCache, ChunkedPrefillWithMaskAndScoreMod) {
  auto gpt = small_gqa_gpt();
  NoGradGuard ng;
  const int64_t B = 2;
  Tensor idx = random_tokens(B, 29, 6);
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
    EXPECT_TRUE(close(b, a, 1e-5, 1e-4)) << "score_mod " << with_score;
  }
}

TEST(PagedKVCache, GenerateMatchesContiguous) {
  auto gpt = small_gqa_gpt();
  const int64_t P = 11;
  Tensor prompt = random_tokens(2, P, 7);
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

TEST(PagedKVCache, PoolExhaustionIsAClearErrorAndChangesNothing) {
  NoGradGuard ng;
  PagedKVCache c(2, 2, 64, 4, kPage, 5);
  Tensor k = randn({2, 2, 9, 4}), v = randn({2, 2, 9, 4});
  c.append(k, v);  // 2 pages per row: 4 of 5
  EXPECT_EQ(c.pages_in_use(), 4);
  Tensor k1 = randn({2, 2, 8, 4});
  EXPECT_THROW_MSG(c.append(k1, k1), ValueError, "PagedKVCache.append: page pool exhausted", "from 9 to 17 tokens",
                   "need 2 more page(s) of 8", "only 1 of 5 pages are free");
  EXPECT_EQ(c.length(), 9);
  EXPECT_EQ(c.pages_in_use(), 4);
  // Still usable: the next token fits in the reserved pages.
  Tensor k2 = randn({2, 2, 1, 4});
  c.append(k2, k2);
  EXPECT_EQ(c.length(), 10);
  // Through generate: a pool too small for the prompt.
  auto gpt = small_gqa_gpt();
  EXPECT_THROW_MSG(gpt->generate(random_tokens(2, 11, 8), 3, {.temperature = 0, .cache_factory = paged_kv_cache_factory(kPage, 3)}),
                   ValueError, "page pool exhausted", "need 4 more page(s)", "only 3 of 3");
}

TEST(PagedKVCache, ResetFreesPagesAndAttendsAfresh) {
  NoGradGuard ng;
  Generator g(9);
  PagedKVCache c(2, 2, 40, 4, kPage);
  EXPECT_EQ(c.n_pages(), 10);
  Tensor k = randn({2, 2, 20, 4}, kFloat32, &g), v = randn({2, 2, 20, 4}, kFloat32, &g);
  Tensor q = randn({2, 4, 3, 4}, kFloat32, &g);
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
  ContiguousKVCache ref(2, 2, 40, 4);
  ref.append(k2, v2);
  EXPECT_TRUE(close(c.attend(q, o).out, ref.attend(q, o).out, 1e-6, 1e-5));
  EXPECT_TRUE(close(c.attend(q, o).out, flex_attention(q, ref.keys().contiguous(), ref.values().contiguous(), o).out,
                    1e-6, 1e-5));
}

TEST(PagedKVCache, Errors) {
  NoGradGuard ng;
  EXPECT_THROW_MSG(PagedKVCache(2, 2, 0, 4, 8), ValueError, "PagedKVCache: sizes must be positive", "max_len 0");
  EXPECT_THROW_MSG(PagedKVCache(2, 2, 16, 4, 8, -1), ValueError, "n_pages must be >= 0", "got -1");
  EXPECT_THROW_MSG(paged_kv_cache_factory(0), ValueError, "page_size must be positive");
  PagedKVCache c(2, 2, 16, 4, 8);
  Tensor q = randn({2, 4, 1, 4});
  FlexAttentionOptions o;
  o.enable_gqa = true;
  EXPECT_THROW_MSG(c.attend(q, o), ValueError, "PagedKVCache.attend: q has 1 queries but 0 tokens are cached");
  EXPECT_THROW_MSG(c.append(randn({1, 2, 3, 4}), randn({1, 2, 3, 4})), ShapeError,
                   "PagedKVCache.append: k [1, 2, 3, 4] does not match the cache [2, 2, *, 4]");
  EXPECT_THROW_MSG(c.append(randn({2, 2, 3, 4}), randn({2, 2, 2, 4})), ShapeError, "k and v must be [B, Hkv, L, E]");
  EXPECT_THROW_MSG(c.append(randn({2, 2, 17, 4}), randn({2, 2, 17, 4})), IndexError,
                   "0 cached + 17 new tokens exceed capacity 16");
  c.append(randn({2, 2, 5, 4}), randn({2, 2, 5, 4}));
  o.block_mask = create_block_mask(noop_mask, std::nullopt, std::nullopt, 1, 4, 8);
  EXPECT_THROW_MSG(c.attend(q, o), ShapeError, "created for (Q_LEN, KV_LEN) = (1, 4)", "1 queries over 5 cached");
  o.block_mask.reset();
  EXPECT_THROW_MSG(c.attend(randn({2, 4, 1, 3}), o), ShapeError, "q [2, 4, 1, 3] does not match the cache");
}

}  // namespace
}  // namespace fg::testing
