// Numerical gradient checking: float64 central differences against the analytical gradient.
#pragma once
#include <functional>
#include <string>

#include "flexgrad/tensor/tensor.h"

namespace fg {

struct GradcheckOptions {
  double eps = 1e-6;
  double atol = 1e-5;
  double rtol = 1e-3;
  bool raise_on_failure = false;  // throw AutogradError with the report instead of returning false
};

struct GradcheckResult {
  bool ok = true;
  // The worst element (largest |numeric - analytic| - rtol*|numeric|) over all inputs and outputs.
  int64_t input = -1;
  int64_t output = -1;
  Shape index;         // element of input `input` that was perturbed
  Shape output_index;  // element of output `output` whose derivative is worst
  double numeric = 0, analytic = 0;
  double atol = 0, rtol = 0;  // the tolerances the check used (for the report)
  int64_t checked = 0;        // Jacobian entries compared
  std::string report() const;
};

// fn maps inputs to outputs; every floating input that requires grad must be float64. Each element of
// each such input is perturbed by +-eps; the Jacobian is compared against one backward per output element.
GradcheckResult gradcheck(const std::function<TensorList(const TensorList&)>& fn, const TensorList& inputs,
                          GradcheckOptions options = {});

}  // namespace fg
