// FlexAttention on the CPU: fused kernels vs the reference path (f32, B=1, H=8, L=2048, E=64 by default),
// forward and forward+backward time, peak memory, GFLOP/s counted on the visited blocks, for no mask,
// causal, sliding window 256 and a ~10%-dense document mask.
#include <CLI/CLI.hpp>
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

template <class F> double seconds(F f, int reps) {
  f();  // warm-up
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) f();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flex_attention CPU benchmark"};
  int64_t B = 1, H = 8, L = 2048, E = 64;
  int reps = 3;
  bool reference = true;
  app.add_option("-B", B);
  app.add_option("-H", H);
  app.add_option("-L", L);
  app.add_option("-E", E);
  app.add_option("--reps", reps);
  app.add_flag("!--no-reference", reference, "skip the (slow, O(L^2) memory) reference path");
  CLI11_PARSE(app, argc, argv);

  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // rows appear as they are measured, also through pipes
  manual_seed(0);
  Tensor q = randn({B, H, L, E}).requires_grad_(), k = randn({B, H, L, E}).requires_grad_(), v = randn({B, H, L, E}).requires_grad_();
  std::vector<int64_t> doc(L);
  for (int64_t i = 0; i < L; ++i) doc[i] = i / std::max<int64_t>(1, L / 16);  // 16 equal documents: ~10% of blocks visited
  Captured doc_ids(from_vector(doc, {L}, kInt64));
  struct Case { const char* name; std::optional<BlockMask> mask; };
  std::vector<Case> cases = {
      {"no mask", std::nullopt},
      {"causal", create_block_mask([](Expr, Expr, Expr qi, Expr kv) { return qi >= kv; }, std::nullopt, std::nullopt, L, L, 128)},
      {"sliding 256", create_block_mask([](Expr, Expr, Expr qi, Expr kv) { return (qi >= kv) & (qi - kv <= 256); }, std::nullopt, std::nullopt, L, L, 128)},
      {"document", create_block_mask([doc_ids](Expr, Expr, Expr qi, Expr kv) { return Expr(doc_ids[qi]) == Expr(doc_ids[kv]); }, std::nullopt, std::nullopt, L, L, 128)},
  };
  std::printf("flex_attention CPU, f32, B=%ld H=%ld L=%ld E=%ld, %d threads\n", B, H, L, E, omp_get_max_threads());
  std::printf("%-13s %-9s %8s %10s %9s %10s %10s %9s %8s\n", "mask", "path", "density", "fwd ms", "fwd GF/s", "fwd+bwd ms",
              "f+b GF/s", "peak MiB", "speedup");
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
      o.kernel.backend = be;
      reset_peak();
      double base = peak_rss_mib();
      double tf = seconds([&] { NoGradGuard g; flex_attention(q, k, v, o); }, reps);
      double tfb = seconds([&] { flex_attention(q, k, v, o).out.sum().backward(); }, reps);
      double peak = peak_rss_mib() - base;
      if (be == FlexBackend::Fused) { fused_fwd = tf; fused_fb = tfb; }
      std::string speed = be == FlexBackend::Reference ? fmt::format("{:.1f}x", tfb / fused_fb) : "";
      std::printf("%-13s %-9s %7.1f%% %10.1f %9.1f %10.1f %10.1f %9.0f %8s\n", c.name,
                  be == FlexBackend::Fused ? "fused" : "reference", density * 100, tf * 1e3, fwd_flops / tf / 1e9, tfb * 1e3,
                  (fwd_flops + bwd_flops) / tfb / 1e9, peak, speed.c_str());
      (void)fused_fwd;
    }
  }
  return 0;
}
