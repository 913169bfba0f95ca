// FlexAttention on the CPU: fused kernels vs the reference path (f32, B=1, H=8, L=2048, E=64 by default),
// forward and forward+backward time, peak memory, GFLOP/s counted on the visited blocks, for no mask,
// causal, sliding window 256 and a ~6%-dense document mask (16 documents). --csv prints machine-readable rows
// (bench/flex_cpu_vs_torch.py reads them); --threads sets the OpenMP thread count; --masks picks cases;
// --softcap C adds the score_mod C * tanh(score / C) to every case.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <omp.h>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/ops/ops.h"

using namespace fg;

namespace {

// Peak resident memory of this process so far (VmHWM), in MiB; reset between measurements.
double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  }
  return 0;
}
void reset_peak() { std::ofstream("/proc/self/clear_refs") << "5"; }

// The fastest of `reps` timed calls after a warm-up: on a shared machine the minimum is the least noisy estimate.
template <class F> double seconds(F f, int reps) {
  f();  // warm-up
  double best = 1e30;
  for (int i = 0; i < reps; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    f();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return best;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flex_attention CPU benchmark"};
  int64_t B = 1, H = 8, L = 2048, E = 64;
  int reps = 3;
  bool reference = true, backward = true, csv = false;
  int threads = 0;
  std::vector<std::string> masks;
  std::string dtype_name = "f32";
  double softcap = 0;
  app.add_option("-B", B);
  app.add_option("-H", H);
  app.add_option("-L", L);
  app.add_option("-E", E);
  app.add_option("--reps", reps);
  app.add_flag("!--no-reference", reference, "skip the (slow, O(L^2) memory) reference path");
  app.add_flag("!--no-backward", backward, "time the forward only");
  app.add_flag("--csv", csv, "print CSV rows: mask,path,density,fwd_ms,fwd_gflops,fb_ms,fb_gflops");
  app.add_option("--threads", threads, "OpenMP threads (default: OMP_NUM_THREADS or all cores)")->check(CLI::PositiveNumber);
  app.add_option("--dtype", dtype_name, "input dtype: f32 or bf16 (bf16 products on AVX-512 BF16)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  app.add_option("--masks", masks, "cases to run (default all): none causal sliding document");
  app.add_option("--softcap", softcap, "score_mod C * tanh(score / C) on every case (default: none)")
      ->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  if (threads > 0) omp_set_num_threads(threads);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows appear as they are measured, also through pipes
  manual_seed(0);
  const DType dt = dtype_name == "bf16" ? kBFloat16 : kFloat32;
  Tensor q = randn({B, H, L, E}).to(dt).requires_grad_(), k = randn({B, H, L, E}).to(dt).requires_grad_(),
         v = randn({B, H, L, E}).to(dt).requires_grad_();
  std::vector<int64_t> doc(L);
  for (int64_t i = 0; i < L; ++i) doc[i] = i / std::max<int64_t>(1, L / 16);  // 16 equal documents: ~10% of blocks visited
  Captured doc_ids(from_vector(doc, {L}, kInt64));
  struct Case { const char* key; const char* name; std::optional<BlockMask> mask; };
  auto wanted = [&](const char* key) { return masks.empty() || std::find(masks.begin(), masks.end(), key) != masks.end(); };
  std::vector<Case> cases;
  if (wanted("none")) cases.push_back({"none", "no mask", std::nullopt});
  if (wanted("causal"))
    cases.push_back({"causal", "causal", create_block_mask([](Expr, Expr, Expr qi, Expr kv) { return qi >= kv; }, std::nullopt, std::nullopt, L, L, 128)});
  if (wanted("sliding"))
    cases.push_back({"sliding", "sliding 256", create_block_mask([](Expr, Expr, Expr qi, Expr kv) { return (qi >= kv) & (qi - kv <= 256); }, std::nullopt, std::nullopt, L, L, 128)});
  if (wanted("document"))
    cases.push_back({"document", "document", create_block_mask([doc_ids](Expr, Expr, Expr qi, Expr kv) { return Expr(doc_ids[qi]) == Expr(doc_ids[kv]); }, std::nullopt, std::nullopt, L, L, 128)});
  if (csv) {
    std::printf("mask,path,threads,density,fwd_ms,fwd_gflops,fb_ms,fb_gflops\n");
  } else {
    std::printf("flex_attention CPU, %s, B=%ld H=%ld L=%ld E=%ld, %d threads%s\n", dtype_name.c_str(), B, H, L, E,
                omp_get_max_threads(), softcap > 0 ? fmt::format(", softcap {}", softcap).c_str() : "");
    std::printf("%-13s %-9s %8s %10s %9s %10s %10s %9s %8s\n", "mask", "path", "density", "fwd ms", "fwd GF/s", "fwd+bwd ms",
                "f+b GF/s", "peak MiB", "speedup");
  }
  for (auto& c : cases) {
    double density = c.mask ? 1.0 - c.mask->sparsity() / 100.0 : 1.0;
    // Visited-block FLOPs: 2 matmuls forward (QK^T, PV), 5 backward (recompute QK^T twice in our two passes
    // counted once as PyTorch counts: QK^T, dP, dV, dQ, dK).
    double fwd_flops = 4.0 * B * H * L * L * E * density, bwd_flops = 10.0 * B * H * L * L * E * density;
    double fused_fwd = 0, fused_fb = 0;
    for (FlexBackend be : {FlexBackend::Fused, FlexBackend::Reference}) {
      if (be == FlexBackend::Reference && !reference) continue;
      FlexAttentionOptions o;
      o.block_mask = c.mask;
      if (softcap > 0) o.score_mod = [softcap](Expr s, Expr, Expr, Expr, Expr) { return softcap * tanh(s / softcap); };
      o.kernel.backend = be;
      reset_peak();
      double base = peak_rss_mib();
      double tf = seconds([&] { NoGradGuard g; flex_attention(q, k, v, o); }, reps);
      double tfb = backward ? seconds([&] { flex_attention(q, k, v, o).out.sum().backward(); }, reps) : 0.0;
      double peak = peak_rss_mib() - base;
      if (be == FlexBackend::Fused) { fused_fwd = tf; fused_fb = tfb; }
      std::string speed = be == FlexBackend::Reference && backward ? fmt::format("{:.1f}x", tfb / fused_fb) : "";
      const double fb_gflops = backward ? (fwd_flops + bwd_flops) / tfb / 1e9 : 0.0;
      if (csv) {
        std::printf("%s,%s,%d,%.8f,%.3f,%.2f,%.3f,%.2f\n", c.key, be == FlexBackend::Fused ? "fused" : "reference",
                    omp_get_max_threads(), density, tf * 1e3, fwd_flops / tf / 1e9, tfb * 1e3, fb_gflops);
        continue;
      }
      std::printf("%-13s %-9s %7.1f%% %10.1f %9.1f %10.1f %10.1f %9.0f %8s\n", c.name,
                  be == FlexBackend::Fused ? "fused" : "reference", density * 100, tf * 1e3, fwd_flops / tf / 1e9, tfb * 1e3,
                  fb_gflops, peak, speed.c_str());
      (void)fused_fwd;
    }
  }
  return 0;
}
