// Finite-difference gradient check for the op tests, used until fg::gradcheck (autograd/gradcheck.h)
// has an implementation on main. It checks the vector-Jacobian product of a weighted sum of all outputs
// (fixed, non-uniform weights so that symmetric errors do not cancel) against central differences.
#pragma once
#include <cmath>
#include <functional>

#include "tests/test_util.h"

namespace fg::testing {

// Deterministic pseudo-random values in about [-1.5, 1.5] (tensor/random.h's factories are not on main
// yet); irrational frequencies keep ties and zeros away.
inline Tensor noise(const Shape& shape, DType dtype = kFloat64, double seed = 0) {
  NoGradGuard ng;
  Tensor i = arange(0, static_cast<double>(shape_numel(shape)), 1, kFloat64);
  return reshape(sin(i * 2.3999632 + seed) * 1.5, shape).to(dtype);
}

inline ::testing::AssertionResult fd_check(const std::function<Tensor(const TensorList&)>& fn, TensorList inputs,
                                           double eps = 1e-6, double atol = 1e-6, double rtol = 1e-4) {
  for (auto& x : inputs) x = x.detach().clone().requires_grad_(true);
  Tensor out = fn(inputs);
  Tensor w = empty(out.sizes(), out.options());
  {
    NoGradGuard ng;
    Tensor flat = arange(0, static_cast<double>(out.numel()), 1, kFloat64);
    w = reshape(sin(flat * 1.3) + 1.5, out.sizes()).to(out.dtype());
  }
  sum(out * w).backward();
  auto loss = [&]() {
    NoGradGuard ng;
    return sum(fn(inputs).to(kFloat64) * w.to(kFloat64)).item<double>();
  };
  for (size_t i = 0; i < inputs.size(); ++i) {
    Tensor x = inputs[i];
    Tensor g = x.grad().defined() ? x.grad() : zeros(x.sizes(), x.options());
    for (int64_t e = 0; e < x.numel(); ++e) {
      Shape idx(x.dim());
      for (int64_t d = x.dim() - 1, r = e; d >= 0; --d) { idx[d] = r % x.sizes()[d]; r /= x.sizes()[d]; }
      const double orig = x.at(idx);
      x.set_at(idx, orig + eps);
      const double up = loss();
      x.set_at(idx, orig - eps);
      const double down = loss();
      x.set_at(idx, orig);
      const double numeric = (up - down) / (2 * eps), analytic = g.at(idx);
      if (!(std::abs(numeric - analytic) <= atol + rtol * std::abs(numeric))) {
        return ::testing::AssertionFailure() << "input " << i << " element " << e << ": numeric " << numeric
                                             << " vs analytic " << analytic;
      }
    }
  }
  return ::testing::AssertionSuccess();
}

}  // namespace fg::testing
