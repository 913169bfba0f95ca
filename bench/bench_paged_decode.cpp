// Decode-step time through the paged cache vs the same step over contiguous K/V, at equal lengths.
//
// One decode step: q [B, Hq, 1, E] attends to every sequence's L keys (GQA Hq/Hkv), float32, fused CPU kernel.
//   contiguous: flex_attention(q, k [B, Hkv, L, E], v, no mask)
//   paged:      flex_attention(q, k_cache [1, Hkv, n_pages*page, E], v_cache, converted block mask with kv_len)
// The cache is filled as PyTorch's paged tests do (four reserve rounds interleave every sequence's pages), so
// pages are scattered. Both paths use the same kv block size (= page size). "paged+convert" adds the per-step
// convert_logical_block_mask a decode loop pays. Reports the median of --reps runs per length.
//
//   OMP_NUM_THREADS=2 bench_paged_decode --reps 5
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <omp.h>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/ops/ops.h"

using namespace fg;

namespace {

template <class F> double median_ms(int reps, F&& f) {
  f();  // warm-up
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"paged vs contiguous flex_attention decode step"};
  int64_t B = 16, hq = 32, hkv = 8, e = 128, page = 128;
  int reps = 5;
  std::vector<int64_t> lengths{512, 1024, 2048, 4096};
  app.add_option("--batch", B, "sequences");
  app.add_option("--hq", hq, "query heads");
  app.add_option("--hkv", hkv, "key/value heads");
  app.add_option("--head-dim", e, "head dimension");
  app.add_option("--page-size", page, "page size = kv block size");
  app.add_option("--reps", reps, "timed repetitions per point (median reported)");
  app.add_option("--lengths", lengths, "sequence lengths");
  CLI11_PARSE(app, argc, argv);
  NoGradGuard no_grad;
  std::printf("B=%lld Hq=%lld Hkv=%lld E=%lld page=%lld f32, median of %d, OMP threads %d\n", (long long)B,
              (long long)hq, (long long)hkv, (long long)e, (long long)page, reps, omp_get_max_threads());
  std::printf("%6s %14s %12s %18s %10s %10s %8s\n", "L", "contiguous ms", "paged ms", "paged+convert ms", "overhead",
              "+convert", "GB/s");
  for (int64_t L : lengths) {
    manual_seed(static_cast<uint64_t>(L));
    Tensor q = randn({B, hq, 1, e});
    Tensor k = randn({B, hkv, L, e}), v = randn({B, hkv, L, e});
    const int64_t n_pages = (L + page - 1) / page * B;
    PagedAttention pa(n_pages, page, B);
    for (int64_t f : {4, 2, 1}) {  // L/4, L/2, L: pages of all sequences interleave
      for (int64_t b = 0; b < B; ++b) pa.reserve(b, L / f);
    }
    Tensor kc = zeros({1, hkv, pa.max_cached_seq_len(), e}), vc = zeros_like(kc);
    pa.assign(arange(0, double(B), 1, kInt64), arange(0, double(L), 1, kInt64).unsqueeze(0).expand({B, L}), k, v, kc,
              vc);
    Tensor kv_len = full({B}, L, kInt64);
    BlockMask logical = create_block_mask(noop_mask, B, 1, 1, L, BlockSize(1, page)  /* Lq = 1: a 1-row q block lets pages be full */);

    FlexAttentionOptions co;
    co.enable_gqa = true;
    co.kernel.block_kv = page;
    FlexAttentionOptions po;
    po.enable_gqa = true;
    po.block_mask = pa.convert_logical_block_mask(logical, Tensor(), kv_len);

    // Same answer (sanity), then time.
    Tensor ref = flex_attention(q, k, v, co).out, got = flex_attention(q, kc, vc, po).out;
    const double diff = fg::max(fg::abs(ref - got)).item<double>();
    if (!(diff < 1e-4)) {
      std::printf("paged result differs from contiguous by %g at L=%lld\n", diff, (long long)L);
      return 1;
    }
    const double tc = median_ms(reps, [&] { flex_attention(q, k, v, co); });
    const double tp = median_ms(reps, [&] { flex_attention(q, kc, vc, po); });
    const double tpc = median_ms(reps, [&] {
      FlexAttentionOptions o = po;
      o.block_mask = pa.convert_logical_block_mask(logical, Tensor(), kv_len);
      flex_attention(q, kc, vc, o);
    });
    const double bytes = 2.0 * double(B * hkv * L * e) * 4;
    std::printf("%6lld %14.2f %12.2f %18.2f %9.1f%% %9.1f%% %8.1f\n", (long long)L, tc, tp, tpc, 100 * (tp / tc - 1),
                100 * (tpc / tc - 1), bytes / (tc * 1e6));
    std::fflush(stdout);
  }
  return 0;
}
