// A consumer of the installed flexgrad: one include, one target (flexgrad::flexgrad). It runs a small causal
// flex_attention with an ALiBi-like score_mod, forward and backward, on the CPU and also on a GPU when the
// library has the CUDA backend and a device is present, and checks the output and the gradient of v against
// a plain float64 loop written here (independent of flexgrad's kernels):
//   out[i] = sum_j P[i][j] v[j],  P = softmax_j(scale q[i].k[j] + slope (j - i)) over j <= i
//   d sum(out) / d v[j] = sum_i P[i][j]   (the same for every feature e)
#include <flexgrad/flexgrad.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

#ifdef FLEXGRAD_WITH_CUDA  // defined by flexgrad::flexgrad when the installed library has the CUDA backend
#define FLEXGRAD_BUILT_WITH_CUDA true
#else
#define FLEXGRAD_BUILT_WITH_CUDA false
#endif

namespace {
using namespace fg;

// Runs the check on `device`; returns whether it passed.
bool check_on(Device device) {
  const int64_t L = 24, E = 8;
  const double slope = 0.25;
  manual_seed(7);
  const TensorOptions o = TensorOptions(kFloat64).device(device);
  Tensor q = randn({1, 1, L, E}, o).requires_grad_(), k = randn({1, 1, L, E}, o).requires_grad_(),
         v = randn({1, 1, L, E}, o).requires_grad_();
  FlexAttentionOptions opt;
  opt.score_mod = [slope](Expr score, Expr b, Expr h, Expr qi, Expr kv) { return score + (kv - qi) * slope; };
  opt.block_mask = create_block_mask([](Expr b, Expr h, Expr qi, Expr kv) { return qi >= kv; }, std::nullopt,
                                     std::nullopt, L, L, /*block_size=*/8, device);
  Tensor out = flex_attention(q, k, v, opt).out;
  out.sum().backward();

  const std::vector<double> qv = q.to_vector(), kv = k.to_vector(), vv = v.to_vector(), ov = out.to_vector(),
                            dv = v.grad().to_vector();
  const double scale = 1.0 / std::sqrt(static_cast<double>(E));
  std::vector<double> want_out(L * E, 0.0), want_dv(L, 0.0);
  for (int64_t i = 0; i < L; ++i) {
    std::vector<double> s(i + 1);
    double m = -INFINITY, z = 0;
    for (int64_t j = 0; j <= i; ++j) {
      double dot = 0;
      for (int64_t e = 0; e < E; ++e) dot += qv[i * E + e] * kv[j * E + e];
      s[j] = scale * dot + slope * static_cast<double>(j - i);
      m = std::max(m, s[j]);
    }
    for (int64_t j = 0; j <= i; ++j) z += std::exp(s[j] - m);
    for (int64_t j = 0; j <= i; ++j) {
      const double p = std::exp(s[j] - m) / z;
      want_dv[j] += p;
      for (int64_t e = 0; e < E; ++e) want_out[i * E + e] += p * vv[j * E + e];
    }
  }
  double err_out = 0, err_dv = 0;
  for (int64_t i = 0; i < L * E; ++i) {
    err_out = std::max(err_out, std::abs(ov[i] - want_out[i]));
    err_dv = std::max(err_dv, std::abs(dv[i] - want_dv[i / E]));
  }
  const bool ok = err_out < 1e-12 && err_dv < 1e-12;
  fmt::print("flexgrad consumer: {} causal flex_attention (BlockMask sparsity {:.1f}%), out {}, dq {} | "
             "max |out - loop| {:.2e} | max |dv - loop| {:.2e} (tolerance 1e-12){}\n",
             device.type == DeviceType::CUDA ? "cuda" : "cpu", opt.block_mask->sparsity(), out.sizes(),
             q.grad().sizes(), err_out, err_dv, ok ? "" : ": FAILED");
  return ok;
}

}  // namespace

int main() try {
  bool ok = check_on(kCPU);
  // A CUDA build on a machine with a GPU: the same check through the kernels NVRTC compiles at run time from
  // the templates embedded in the installed library.
  if (device_count(DeviceType::CUDA) > 0) ok = check_on(kCUDA) && ok;
  else fmt::print("flexgrad consumer: no CUDA device{}, CPU only\n",
                  FLEXGRAD_BUILT_WITH_CUDA ? "" : " (flexgrad built without CUDA)");
  if (!ok) return 1;
  fmt::print("flexgrad consumer: ok\n");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "flexgrad consumer: error: %s\n", e.what());
  return 1;
}
