// Plain float64 gelu and its derivative, written from the formulas (tanh approximation or erf), shared by the
// CPU and CUDA gelu tests as their golden.
#pragma once
#include <cmath>
#include <numbers>

namespace fg::testing {

inline double gelu_golden(double v, bool tanh_approx, double* d) {
  if (tanh_approx) {
    const double beta = std::sqrt(2.0 / std::numbers::pi), kappa = 0.044715;
    const double t = std::tanh(beta * (v + kappa * v * v * v));
    *d = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * beta * (1 + 3 * kappa * v * v);
    return 0.5 * v * (1 + t);
  }
  const double cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
  *d = cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi);
  return v * cdf;
}

}  // namespace fg::testing
