// gradcheck: compares the Jacobian the tape computes (one backward per output element, each seeded with a
// one-hot gradient) with central differences (one pair of forward calls per input element). Everything
// goes through element access (at / set_at / to_vector), so it needs no ops and works on any device.
#include "flexgrad/autograd/gradcheck.h"

#include <cmath>
#include <limits>

#include "flexgrad/autograd/engine.h"
#include "flexgrad/autograd/grad_mode.h"

namespace fg {
namespace {

// Row-major multi-index of element `linear` in a tensor of `sizes`.
Shape unravel(int64_t linear, const Shape& sizes) {
  Shape idx(sizes.size());
  for (size_t d = sizes.size(); d-- > 0;) {
    idx[d] = linear % sizes[d];
    linear /= sizes[d];
  }
  return idx;
}

// Values of each compared output (row-major), with the count checked against the first call.
std::vector<std::vector<double>> output_values(const TensorList& outs, const std::vector<size_t>& compared,
                                               size_t expected_count) {
  FG_CHECK(outs.size() == expected_count, ValueError,
           "gradcheck: fn returned {} outputs on a perturbed input but {} on the original", outs.size(),
           expected_count);
  std::vector<std::vector<double>> v;
  for (size_t o : compared) v.push_back(outs[o].to_vector());
  return v;
}

}  // namespace

std::string GradcheckResult::report() const {
  if (input < 0) return fmt::format("gradcheck {}: no Jacobian entries were compared", ok ? "passed" : "failed");
  std::string where = fmt::format(
      "output {} at index {} with respect to input {} at index {}: numerical {:.10g} vs analytical {:.10g}", output,
      shape_str(output_index), input, shape_str(index), numeric, analytic);
  double diff = std::abs(numeric - analytic);
  if (ok) {
    return fmt::format("gradcheck passed: {} Jacobian entries within atol={} rtol={}; worst is {} (|difference| {:.3g})",
                       checked, atol, rtol, where, diff);
  }
  return fmt::format("gradcheck failed: Jacobian mismatch for {} (|difference| {:.3g} > atol {} + rtol {} * |numerical|)",
                     where, diff, atol, rtol);
}

GradcheckResult gradcheck(const std::function<TensorList(const TensorList&)>& fn, const TensorList& inputs,
                          GradcheckOptions options) {
  FG_CHECK(options.eps > 0 && options.atol >= 0 && options.rtol >= 0, ValueError,
           "gradcheck: expected eps > 0, atol >= 0, rtol >= 0 (got eps={}, atol={}, rtol={})", options.eps,
           options.atol, options.rtol);
  // Inputs to differentiate: every defined input that requires grad. Finite differences in anything but
  // float64 are too coarse to tell a wrong gradient from rounding, so those are refused.
  std::vector<size_t> diff_inputs;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!inputs[i].defined() || !inputs[i].requires_grad()) continue;
    FG_CHECK(inputs[i].dtype() == kFloat64, DTypeError,
             "gradcheck: input {} requires grad but has dtype {}; gradcheck needs float64 inputs", i,
             inputs[i].dtype());
    diff_inputs.push_back(i);
  }
  FG_CHECK(!diff_inputs.empty(), ValueError, "gradcheck: no input requires grad ({} inputs given)", inputs.size());
  TensorList diff_tensors;
  for (size_t i : diff_inputs) diff_tensors.push_back(inputs[i]);

  TensorList outputs;
  {
    EnableGradGuard grad_on;
    outputs = fn(inputs);
  }
  // Outputs compared: the defined floating ones. Those without a tape have an analytical Jacobian of zero.
  std::vector<size_t> compared;
  TensorList roots;
  std::vector<size_t> root_of;  // position in `roots` for each compared output, or npos
  for (size_t o = 0; o < outputs.size(); ++o) {
    if (!outputs[o].defined() || !outputs[o].is_floating_point()) continue;
    compared.push_back(o);
    if (outputs[o].requires_grad()) {
      root_of.push_back(roots.size());
      roots.push_back(outputs[o]);
    } else {
      root_of.push_back(std::string::npos);
    }
  }

  // analytic[c][p]: Jacobian of compared output c w.r.t. diff input p, [out element][in element] row-major.
  std::vector<std::vector<std::vector<double>>> analytic(compared.size());
  for (size_t c = 0; c < compared.size(); ++c) {
    const Tensor& out = outputs[compared[c]];
    int64_t n_out = out.numel();
    for (size_t p = 0; p < diff_inputs.size(); ++p) {
      analytic[c].emplace_back(static_cast<size_t>(n_out * diff_tensors[p].numel()), 0.0);
    }
    if (root_of[c] == std::string::npos) continue;
    for (int64_t j = 0; j < n_out; ++j) {
      TensorList seeds;
      for (const Tensor& r : roots) seeds.push_back(zeros(r.sizes(), r.options()));
      seeds[root_of[c]].set_at(unravel(j, out.sizes()), 1.0);
      TensorList grads = grad(roots, diff_tensors, seeds, /*retain_graph=*/true, /*allow_unused=*/true);
      for (size_t p = 0; p < diff_inputs.size(); ++p) {
        if (!grads[p].defined()) continue;  // unused input: its row stays zero
        FG_CHECK(grads[p].sizes() == diff_tensors[p].sizes(), AutogradError,
                 "gradcheck: analytical gradient of input {} has shape {} but the input has shape {}", diff_inputs[p],
                 shape_str(grads[p].sizes()), shape_str(diff_tensors[p].sizes()));
        std::vector<double> g = grads[p].to_vector();
        int64_t n_in = diff_tensors[p].numel();
        std::copy(g.begin(), g.end(), analytic[c][p].begin() + j * n_in);
      }
    }
  }

  GradcheckResult result;
  result.atol = options.atol;
  result.rtol = options.rtol;
  double worst_score = -std::numeric_limits<double>::infinity();
  {
    NoGradGuard no_grad;  // the perturbed forwards are plain evaluations
    for (size_t p = 0; p < diff_inputs.size(); ++p) {
      const Tensor& x = diff_tensors[p];
      for (int64_t k = 0; k < x.numel(); ++k) {
        Shape idx = unravel(k, x.sizes());
        double orig = x.at(idx);
        x.set_at(idx, orig + options.eps);
        auto plus = output_values(fn(inputs), compared, outputs.size());
        x.set_at(idx, orig - options.eps);
        auto minus = output_values(fn(inputs), compared, outputs.size());
        x.set_at(idx, orig);
        for (size_t c = 0; c < compared.size(); ++c) {
          for (size_t j = 0; j < plus[c].size(); ++j) {
            double num = (plus[c][j] - minus[c][j]) / (2 * options.eps);
            double ana = analytic[c][p][j * x.numel() + k];
            double diff = std::abs(num - ana);
            bool bad = !(diff <= options.atol + options.rtol * std::abs(num));  // NaN counts as bad
            double score = std::isnan(diff) ? std::numeric_limits<double>::infinity() : diff - options.rtol * std::abs(num);
            ++result.checked;
            if (bad) result.ok = false;
            if (score > worst_score) {
              worst_score = score;
              result.input = static_cast<int64_t>(diff_inputs[p]);
              result.output = static_cast<int64_t>(compared[c]);
              result.index = idx;
              result.output_index = unravel(static_cast<int64_t>(j), outputs[compared[c]].sizes());
              result.numeric = num;
              result.analytic = ana;
            }
          }
        }
      }
    }
  }
  if (!result.ok && options.raise_on_failure) throw AutogradError(result.report());
  return result;
}

}  // namespace fg
