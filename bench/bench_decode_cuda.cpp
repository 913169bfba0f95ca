// One decode step on the GPU: a single query token per sequence against a long K/V, bf16, GQA, contiguous
// and through a PagedAttention cache (pages of all sequences interleaved, read in place through the
// converted BlockMask), on flex_attention's split-KV kernel (what Auto picks) and, for reference, forced onto
// the tiled kernel. Beside them the device-to-device copy bandwidth of the same run, the yardstick of a
// memory-bound kernel.
//
// Reported per variant: ms per call (median of --reps, each the mean of --iters back-to-back calls between two
// CUDA events: what a decode loop pays, host work and, for the paged cache, the error-flag check included),
// the K/V bytes read per second at that time, and the host's time to queue one call (median of the reps'
// means: when it exceeds the GPU's time, the host sets the pace). Kernel-only times come from ncu (tools/device_decode.sh).
// bench/decode_vs_torch.py times PyTorch on the same shapes.
//
//   bench_decode_cuda [--shapes B,Hq,Hkv,S,D ...] [--page-size 64] [--reps 7] [--iters 20] [--kv-splits N]
//                     [--csv FILE]       (FLEXGRAD_FLEX_DECODE_TILE="WARPS,STAGES,MIN_BLOCKS[,L2_PREFETCH]" overrides the tile)
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/ops/ops.h"
#ifdef FLEXGRAD_WITH_CUDA
#include <cuda_runtime.h>

#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

using namespace fg;

#ifdef FLEXGRAD_WITH_CUDA
namespace {

const Device kGpu(DeviceType::CUDA, 0);

// Mean ms of `iters` back-to-back calls of f, median over `reps`; `host_ms` (if given): the median mean time
// the host took to queue one call.
double time_calls(int reps, int iters, const std::function<void()>& f, double* host_ms = nullptr) {
  auto s = static_cast<cudaStream_t>(cuda::current_stream(0));
  for (int i = 0; i < 3; ++i) f();  // warm-up (the first call compiles)
  cuda::synchronize(0);
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t, host;
  for (int r = 0; r < reps; ++r) {
    cudaEventRecord(a, s);
    const auto h0 = std::chrono::steady_clock::now();
    for (int i = 0; i < iters; ++i) f();
    host.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count() / iters);
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / iters);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  std::sort(host.begin(), host.end());
  if (host_ms != nullptr) *host_ms = host[host.size() / 2];
  return t[t.size() / 2];
}

// Device-to-device copy bandwidth (bytes read + written per second) of a 1 GiB buffer.
double copy_bandwidth(int reps) {
  const int64_t n = int64_t{1} << 29;  // bf16 elements: 1 GiB
  Tensor src = ones({n}, TensorOptions().dtype(kBFloat16).device(kGpu)), dst = empty_like(src);
  auto s = static_cast<cudaStream_t>(cuda::current_stream(0));
  const double ms = time_calls(reps, 5, [&] {
    cudaMemcpyAsync(dst.data_ptr(), src.data_ptr(), static_cast<size_t>(n) * 2, cudaMemcpyDeviceToDevice, s);
  });
  return 2.0 * static_cast<double>(n) * 2 / (ms * 1e-3);
}

struct DecodeShape {
  int64_t B, Hq, Hkv, S, D;
};

}  // namespace
#endif

int main(int argc, char** argv) {
  CLI::App app{"flex_attention decode step on the GPU: contiguous vs paged K/V, split-KV vs tiled, vs copy bandwidth"};
  std::vector<std::string> shapes{"8,32,8,8192,128", "32,32,8,4096,128"};
  int64_t page = 64;
  int reps = 7, iters = 20;
  int64_t kv_splits = 0;
  std::string csv;
  app.add_option("--shapes", shapes, "B,Hq,Hkv,S,D per shape");
  app.add_option("--page-size", page, "PagedAttention page size (= kv block size)")->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "timed repetitions (median)")->check(CLI::PositiveNumber);
  app.add_option("--iters", iters, "back-to-back calls per repetition")->check(CLI::PositiveNumber);
  app.add_option("--csv", csv, "also write the rows as CSV");
  app.add_option("--kv-splits", kv_splits, "split-KV: kv ranges per query tile (0: the kernel's choice)")
      ->check(CLI::NonNegativeNumber);
  CLI11_PARSE(app, argc, argv);
#ifndef FLEXGRAD_WITH_CUDA
  std::fprintf(stderr, "bench_decode_cuda: flexgrad was built without CUDA\n");
  return 1;
#else
  if (device_count(DeviceType::CUDA) == 0) {
    std::fprintf(stderr, "bench_decode_cuda: no CUDA device\n");
    return 1;
  }
  NoGradGuard no_grad;
  const double copy_bw = copy_bandwidth(reps);
  std::printf("device-to-device copy: %.2f TB/s (read + write)\n", copy_bw / 1e12);
  std::printf("%-22s %-18s %10s %10s %9s %10s\n", "shape", "variant", "ms/call", "KV TB/s", "% copy", "host ms");
  std::ostringstream rows;
  rows << "shape,variant,ms,kv_tbps,pct_copy,host_ms\n";
  for (const std::string& spec : shapes) {
    DecodeShape sh{};
    if (std::sscanf(spec.c_str(), "%ld,%ld,%ld,%ld,%ld", &sh.B, &sh.Hq, &sh.Hkv, &sh.S, &sh.D) != 5 || sh.Hkv <= 0 ||
        sh.Hq % sh.Hkv != 0) {
      std::fprintf(stderr, "--shapes: expected B,Hq,Hkv,S,D with Hkv dividing Hq, got %s\n", spec.c_str());
      return 2;
    }
    manual_seed(7);
    const auto bf = TensorOptions().dtype(kBFloat16).device(kGpu);
    Tensor q = randn({sh.B, sh.Hq, 1, sh.D}).to(kBFloat16).to(kGpu);
    Tensor k = randn({sh.B, sh.Hkv, sh.S, sh.D}).to(kBFloat16).to(kGpu);
    Tensor v = randn({sh.B, sh.Hkv, sh.S, sh.D}).to(kBFloat16).to(kGpu);
    // The paged cache: four reserve rounds interleave every sequence's pages, as PyTorch's paged tests do.
    const int64_t n_pages = (sh.S + page - 1) / page * sh.B;
    PagedAttention pa(n_pages, page, sh.B, kGpu);
    for (int64_t f : {4, 2, 1})
      for (int64_t b = 0; b < sh.B; ++b) pa.reserve(b, sh.S / f);
    Tensor kc = zeros({1, sh.Hkv, pa.max_cached_seq_len(), sh.D}, bf), vc = zeros_like(kc);
    pa.assign(arange(0, double(sh.B), 1, kInt64), arange(0, double(sh.S), 1, kInt64).unsqueeze(0).expand({sh.B, sh.S}),
              k, v, kc, vc);
    // Lengths on the host, as a server keeps them: convert checks them there without a device read-back.
    Tensor kv_len = full({sh.B}, static_cast<double>(sh.S), kInt64);
    BlockMask logical = create_block_mask(noop_mask, sh.B, 1, 1, sh.S, BlockSize(1, page), kGpu);

    FlexAttentionOptions co;
    co.enable_gqa = true;
    co.kernel.kv_splits = kv_splits;
    FlexAttentionOptions tiled = co;
    tiled.kernel.cuda_forward = FlexCudaForward::Tiled;
    FlexAttentionOptions po;
    po.enable_gqa = true;
    po.kernel.kv_splits = kv_splits;
    po.block_mask = pa.convert_logical_block_mask(logical, Tensor(), kv_len);

    // Same answer (sanity) before any timing.
    Tensor ref = flex_attention(q, k, v, tiled).out.to(kCPU).to(kFloat32);
    for (const auto* o : {&co, &po}) {
      const bool paged = o == &po;
      Tensor got = flex_attention(q, paged ? kc : k, paged ? vc : v, *o).out.to(kCPU).to(kFloat32);
      const double diff = fg::max(fg::abs(ref - got)).item<double>();
      if (!(diff < 2e-2)) {
        std::fprintf(stderr, "%s result differs from the tiled kernel's by %g (%s)\n", paged ? "paged" : "split-KV",
                     diff, spec.c_str());
        return 1;
      }
    }
    const double kv_bytes = 2.0 * static_cast<double>(sh.B * sh.Hkv * sh.S * sh.D) * 2;
    // reads_kv false: a row that reads no K/V (the convert alone) reports no bandwidth.
    auto row = [&](const char* variant, const std::function<void()>& f, bool reads_kv = true) {
      double host_ms = 0;
      const double ms = time_calls(reps, iters, f, &host_ms);
      const double bw = reads_kv ? kv_bytes / (ms * 1e-3) : 0.0;
      std::printf("%-22s %-18s %10.4f %10.3f %8.1f%% %10.4f\n", spec.c_str(), variant, ms, bw / 1e12, 100 * bw / copy_bw,
                  host_ms);
      rows << '"' << spec << "\"," << variant << ',' << ms << ',' << bw / 1e12 << ',' << 100 * bw / copy_bw << ','
           << host_ms << '\n';
      std::fflush(stdout);
    };
    row("contiguous", [&] { flex_attention(q, k, v, co); });
    row("paged", [&] { flex_attention(q, kc, vc, po); });
    row("paged+convert", [&] {
      FlexAttentionOptions o = po;
      o.block_mask = pa.convert_logical_block_mask(logical, Tensor(), kv_len);
      flex_attention(q, kc, vc, o);
    });
    row("convert", [&] { (void)pa.convert_logical_block_mask(logical, Tensor(), kv_len); }, /*reads_kv=*/false);
    row("contiguous-tiled", [&] { flex_attention(q, k, v, tiled); });
  }
  if (!csv.empty()) std::ofstream(csv) << rows.str();
  return 0;
#endif
}
