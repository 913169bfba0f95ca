// flex_attention throughput on the GPU (and, with --device cpu --small, on the CPU so that it runs anywhere):
// the cases of issue 9's table, forward and backward timed separately, TFLOP/s counted on the visited blocks
// as PyTorch's attention-gym counts them:
//   density   = visited blocks * block area / (Q_LEN * KV_LEN)  (= 1 - BlockMask::sparsity() / 100; 1 unmasked)
//   fwd FLOPs = 4 * B * H * D * Q_LEN * KV_LEN * density          (QK^T and PV)
//   bwd FLOPs = 2.5 * fwd FLOPs
// Timing: each call between two CUDA events on flexgrad's stream (steady clock + synchronize on the CPU),
// after warm-up (which also absorbs the JIT compile), gradients reset outside the timed region, median of
// --reps runs. bench/flex_vs_torch.py times PyTorch's compiled flex_attention the same way on the same cases;
// bench/run_flex_bench.sh runs both and prints one table.
// The kernels are Auto's choice (on Hopper cuDNN's SDPA for the programs that lower, see flex_attention.cpp's
// auto_cudnn_call, else the wgmma ones); FLEXGRAD_FLEX_CUDNN=0 keeps Auto on our kernels, and FLEXGRAD_FLEX_WGMMA=0|1 /
// FLEXGRAD_FLEX_WGMMA_BWD=0|1 time the mma.sync or the Hopper (wgmma) forward / backward kernels instead.
// --backend fused|cudnn forces one; the backward is deterministic unless --nondeterministic (cuDNN's float dQ
// accumulator graph, the one the session-8 cuDNN figures were measured on).
//
// --first-call CASE times the first forward and backward of a fresh process (NVRTC compile or disk-cache
// load included) and prints the JIT counters: run it with FLEXGRAD_CACHE_DIR set to an empty directory for
// the cold compile time, then again (second process, same directory) for the cached time.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#ifdef FLEXGRAD_WITH_CUDA
#include <cuda_runtime.h>

#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

using namespace fg;

namespace {

struct BenchCase {
  std::string name;  // shared with flex_vs_torch.py
  DType dtype;
  int64_t B, H, S, D;
  std::string mask;   // none, causal, document, sliding1024
  std::string score;  // none, alibi, softcap
  bool approx_math = false;  // FlexKernelOptions::approx_math (--approx-math)
  bool deterministic = true;  // FlexKernelOptions::deterministic (--nondeterministic clears it)
  bool on_request = false;    // run only when named by --case (not a row of the table)
};

// Issue 9's table.
std::vector<BenchCase> all_cases() {
  return {
      {"nomask", kBFloat16, 4, 16, 4096, 128, "none", "none"},
      {"causal", kBFloat16, 4, 16, 4096, 128, "causal", "none"},
      {"document", kBFloat16, 4, 16, 4096, 128, "document", "none"},
      {"sliding1024", kBFloat16, 4, 16, 4096, 128, "sliding1024", "none"},
      {"alibi_causal", kBFloat16, 4, 16, 4096, 128, "causal", "alibi"},
      {"softcap_causal", kBFloat16, 4, 16, 4096, 128, "causal", "softcap"},
      {"causal_d64_b8", kBFloat16, 8, 16, 4096, 64, "causal", "none"},
      {"causal_s16k_b1", kBFloat16, 1, 16, 16384, 128, "causal", "none"},
      {"fp32_causal", kFloat32, 8, 8, 1024, 64, "causal", "none"},
      // On request: softcap with its division written as a multiplication (what the division costs the kernels).
      {"softcap_mul_causal", kBFloat16, 4, 16, 4096, 128, "causal", "softcap_mul", false, true, true},
  };
}

// Document ids of random lengths in [64, 320) from a 64-bit LCG (seed 2024): the same integers as
// flex_vs_torch.py's doc_ids(), ~11.5% of the 128x128 blocks visited at S=4096.
std::vector<int64_t> doc_ids(int64_t S, uint64_t seed = 2024) {
  std::vector<int64_t> ids;
  uint64_t x = seed;
  int64_t d = 0;
  while (static_cast<int64_t>(ids.size()) < S) {
    x = x * 6364136223846793005ULL + 1442695040888963407ULL;
    const int64_t len = 64 + static_cast<int64_t>((x >> 33) % 256);
    const int64_t n = std::min(len, S - static_cast<int64_t>(ids.size()));
    ids.insert(ids.end(), n, d++);
  }
  return ids;
}

// The case's BlockMask (B = H = 1, broadcast) built on `dev`, and its density. mask_for(d) gives the mask_mod
// over captures on device d.
std::optional<BlockMask> make_mask(const BenchCase& c, Device dev, double& density) {
  const int64_t S = c.S;
  std::function<MaskMod(Device)> mask_for;
  if (c.mask == "none") return std::nullopt;
  if (c.mask == "causal") {
    mask_for = [](Device) { return MaskMod([](Expr, Expr, Expr q, Expr kv) { return q >= kv; }); };
  } else if (c.mask == "sliding1024") {
    mask_for = [](Device) { return MaskMod([](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 1024); }); };
  } else if (c.mask == "document") {
    Tensor ids = from_vector(doc_ids(S), {S}, kInt64);
    mask_for = [ids](Device d) {
      Captured doc(ids.to(d), "doc");
      return MaskMod([doc](Expr, Expr, Expr q, Expr kv) { return Expr(doc[q]) == Expr(doc[kv]); });
    };
  } else {
    throw ValueError("bench_flex_cuda: unknown mask " + c.mask);
  }
  BlockMask m = create_block_mask(mask_for(dev), std::nullopt, std::nullopt, S, S, 128, dev);
  density = 1.0 - m.sparsity() / 100.0;
  return m;
}

ScoreMod make_score(const BenchCase& c) {
  const double H = static_cast<double>(c.H);
  if (c.score == "alibi") {
    return [H](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); };
  }
  if (c.score == "softcap") return [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); };
  if (c.score == "softcap_mul") return [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s * 0.05); };
  return {};
}

void sync(Device dev) {
#ifdef FLEXGRAD_WITH_CUDA
  if (!dev.is_cpu()) cuda::synchronize(dev.index);
#else
  (void)dev;
#endif
}

// Host time of the last CUDA call time_once timed: from entering f to f's return (the launches queued, the GPU
// perhaps still running): flexgrad's own per-call cost, which the event time includes when the GPU has nothing
// queued ahead of the call.
double g_last_host_ms = 0;

// Milliseconds of one call of f (before() runs untimed first).
double time_once(Device dev, const std::function<void()>& before, const std::function<void()>& f) {
  before();
#ifdef FLEXGRAD_WITH_CUDA
  if (!dev.is_cpu()) {
    auto s = static_cast<cudaStream_t>(cuda::current_stream(dev.index));
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    cudaEventRecord(a, s);
    const auto h0 = std::chrono::steady_clock::now();
    f();
    g_last_host_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - h0).count();
    cudaEventRecord(b, s);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    return ms;
  }
#endif
  sync(dev);
  auto t0 = std::chrono::steady_clock::now();
  f();
  sync(dev);
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

// Median event time of f; *host_ms (when given) receives the median host time of the calls (CUDA only).
double median_ms(Device dev, int warmup, int reps, const std::function<void()>& before, const std::function<void()>& f,
                 double* host_ms = nullptr) {
  for (int i = 0; i < warmup; ++i) time_once(dev, before, f);
  std::vector<double> t, h;
  for (int i = 0; i < reps; ++i) {
    t.push_back(time_once(dev, before, f));
    h.push_back(g_last_host_ms);
  }
  std::sort(t.begin(), t.end());
  std::sort(h.begin(), h.end());
  if (host_ms) *host_ms = h[h.size() / 2];
  return t[t.size() / 2];
}

struct Inputs {
  Tensor q, k, v, dout;
  FlexAttentionOptions o;
  double density = 1;
};

Inputs make_inputs(const BenchCase& c, Device dev, FlexBackend backend = FlexBackend::Auto) {
  Generator gen(0);
  auto opts = TensorOptions().dtype(c.dtype).device(dev);
  Inputs in;
  in.q = randn({c.B, c.H, c.S, c.D}, opts, &gen).requires_grad_();
  in.k = randn({c.B, c.H, c.S, c.D}, opts, &gen).requires_grad_();
  in.v = randn({c.B, c.H, c.S, c.D}, opts, &gen).requires_grad_();
  in.dout = randn({c.B, c.H, c.S, c.D}, opts, &gen);
  in.o.block_mask = make_mask(c, dev, in.density);
  in.o.score_mod = make_score(c);
  in.o.kernel.backend = backend;
  in.o.kernel.approx_math = c.approx_math;
  in.o.kernel.deterministic = c.deterministic;
  return in;
}

void reset_grads(Inputs& in) {
  in.q.mutable_grad() = Tensor();
  in.k.mutable_grad() = Tensor();
  in.v.mutable_grad() = Tensor();
}

// Times one case's forward and backward, prints its row (and writes it to csv when open).
void run_case(const BenchCase& c, Device dev, FlexBackend backend, int warmup, int reps, std::ofstream& csv) {
  Inputs in = make_inputs(c, dev, backend);
  const double fwd_flops = 4.0 * c.B * c.H * c.D * static_cast<double>(c.S) * c.S * in.density;
  const double bwd_flops = 2.5 * fwd_flops;
  double fwd_host = 0, bwd_host = 0;
  const double fwd = median_ms(dev, warmup, reps, [] {}, [&] {
    NoGradGuard g;
    flex_attention(in.q, in.k, in.v, in.o);
  }, &fwd_host);
  // Backward alone: one forward with the graph kept, then backward with retain_graph, gradients reset
  // (untimed) before each run as do_bench's grad_to_none.
  Tensor out = flex_attention(in.q, in.k, in.v, in.o).out;
  const double bwd = median_ms(dev, warmup, reps, [&] { reset_grads(in); }, [&] { out.backward(in.dout, true); },
                               &bwd_host);
  std::printf("%-16s %-9s %3ld %3ld %6ld %4ld %7.1f%% %9.3f %9.2f %9.3f %9.2f %8.1f %8.1f\n", c.name.c_str(),
              dtype_name(c.dtype), c.B, c.H, c.S, c.D, in.density * 100, fwd, fwd_flops / fwd / 1e9, bwd,
              bwd_flops / bwd / 1e9, fwd_host * 1e3, bwd_host * 1e3);
  if (csv.is_open()) {
    csv << fmt::format("{},{},{},{},{},{},{:.6f},{:.6f},{:.6f},{:.3f},{:.3f}\n", c.name, dtype_name(c.dtype), c.B, c.H, c.S,
                       c.D, in.density, fwd, bwd, fwd_flops / fwd / 1e9, bwd_flops / bwd / 1e9);
    csv.flush();
  }
}

void print_jit_stats(Device dev) {
#ifdef FLEXGRAD_WITH_CUDA
  if (dev.is_cpu()) return;
  cuda::jit::JitStats s = cuda::jit::stats();
  std::printf("jit: %llu compiles (%.3f s in NVRTC), %llu disk hits, %llu memory hits, cache dir '%s'\n",
              static_cast<unsigned long long>(s.compiles), s.compile_seconds, static_cast<unsigned long long>(s.disk_hits),
              static_cast<unsigned long long>(s.memory_hits), cuda::jit::cache_dir().c_str());
#else
  (void)dev;
#endif
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"flex_attention benchmark (issue 9's cases)"};
  std::string device = device_count(DeviceType::CUDA) > 0 ? "cuda" : "cpu", csv, first_call;
  std::vector<std::string> only;
  int reps = 30, warmup = 5;
  bool small = false, approx_math = false, nondeterministic = false;
  std::string backend_name = "auto";
  app.add_option("--device", device, "cuda or cpu");
  app.add_option("--case", only, "run only these cases (names as in the table)");
  app.add_option("--reps", reps, "timed calls per measurement (median reported)");
  app.add_option("--warmup", warmup, "untimed calls first (absorbs the JIT compile)");
  app.add_flag("--small", small, "B=1, H=2 and S/16: a smoke run that fits a CPU");
  app.add_flag("--approx-math", approx_math, "FlexKernelOptions::approx_math (tanh.approx.f32, div.full.f32 in the mods, CUDA)");
  app.add_flag("--nondeterministic", nondeterministic,
               "FlexKernelOptions::deterministic = false (cuDNN's backward may then accumulate dQ with atomics)");
  app.add_option("--csv", csv, "also write the rows as CSV to this file (read by run_flex_bench.sh)");
  app.add_option("--backend", backend_name,
                 "auto, fused or cudnn (cuDNN's fused SDPA; cases it declines print the reason)")
      ->check(CLI::IsMember({"auto", "fused", "cudnn"}));
  app.add_option("--first-call", first_call, "time only the first forward and backward of this case in this process");
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);

  const Device dev = Device::parse(device);
  const FlexBackend backend = backend_name == "cudnn"   ? FlexBackend::Cudnn
                              : backend_name == "fused" ? FlexBackend::Fused
                                                        : FlexBackend::Auto;
  std::vector<BenchCase> cases;
  for (BenchCase c : all_cases()) {
    const bool named = std::find(only.begin(), only.end(), c.name) != only.end() || c.name == first_call;
    if ((!only.empty() || c.on_request) && !named) continue;
    if (!first_call.empty() && c.name != first_call) continue;
    c.approx_math = approx_math;
    c.deterministic = !nondeterministic;
    if (small) {
      c.B = 1;
      c.H = 2;
      c.S = std::max<int64_t>(256, c.S / 16);
    }
    cases.push_back(c);
  }
  if (cases.empty()) {
    std::fprintf(stderr, "bench_flex_cuda: no case selected\n");
    return 2;
  }

  try {
    if (!first_call.empty()) {
      Inputs in = make_inputs(cases[0], dev, backend);
      sync(dev);
      auto t0 = std::chrono::steady_clock::now();
      Tensor out = flex_attention(in.q, in.k, in.v, in.o).out;
      sync(dev);
      auto t1 = std::chrono::steady_clock::now();
      out.backward(in.dout);
      sync(dev);
      auto t2 = std::chrono::steady_clock::now();
      std::printf("first call of %s on %s: forward %.1f ms, backward %.1f ms (compile or cache load included)\n",
                  cases[0].name.c_str(), dev.str().c_str(), std::chrono::duration<double, std::milli>(t1 - t0).count(),
                  std::chrono::duration<double, std::milli>(t2 - t1).count());
      print_jit_stats(dev);
      return 0;
    }

    std::ofstream csv_out;
    if (!csv.empty()) {
      csv_out.open(csv);
      csv_out << "case,dtype,B,H,S,D,density,fwd_ms,bwd_ms,fwd_tflops,bwd_tflops\n";
    }
    std::printf("flexgrad flex_attention (backend %s) on %s; median of %d after %d warm-up calls; TFLOP/s on visited "
                "blocks%s%s\n", backend_name.c_str(), dev.str().c_str(), reps, warmup, approx_math ? "; approx_math" : "",
                nondeterministic ? "; nondeterministic" : "");
    // host us: the median host time of one call (fwd: flex_attention, bwd: backward()), the launches queued.
    std::printf("%-16s %-9s %3s %3s %6s %4s %8s %9s %9s %9s %9s %8s %8s\n", "case", "dtype", "B", "H", "S", "D", "density",
                "fwd ms", "fwd TF/s", "bwd ms", "bwd TF/s", "fwd host", "bwd host");
    int failed = 0;
    for (const BenchCase& c : cases) {
      try {
        run_case(c, dev, backend, warmup, reps, csv_out);
      } catch (const NotImplementedError& e) {
        // The cuDNN backend declines what it cannot express (the reason is the lowering's): not a failure.
        if (backend == FlexBackend::Cudnn) {
          std::printf("%-16s declined by cudnn: %s\n", c.name.c_str(), e.what());
        } else {
          std::printf("%-16s FAILED: %s\n", c.name.c_str(), e.what());
          ++failed;
        }
      } catch (const std::exception& e) {  // one case that cannot run does not hide the others
        std::printf("%-16s FAILED: %s\n", c.name.c_str(), e.what());
        ++failed;
      }
    }
    print_jit_stats(dev);
    if (failed) return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_flex_cuda: %s\n", e.what());
    return 1;
  }
  return 0;
}
