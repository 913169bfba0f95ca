#include "flexgrad/nn/optim.h"

#include <cmath>
#include <map>

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/optim.h"

namespace fg::nn {

Optimizer::Optimizer(TensorList params, double lr, std::string name)
    : params_(std::move(params)), lr_(lr), name_(std::move(name)), state_(params_.size()) {
  FG_CHECK(lr >= 0, ValueError, "{}: lr must be >= 0, got {}", name_, lr);
  for (size_t i = 0; i < params_.size(); ++i) {
    FG_CHECK(params_[i].defined() && params_[i].is_leaf() && params_[i].requires_grad(), ValueError,
             "{}: parameter {} must be a leaf tensor that requires grad", name_, i);
  }
}

void Optimizer::zero_grad() {
  for (auto& p : params_) {
    if (p.grad().defined()) p.set_grad(Tensor());
  }
}

Tensor& Optimizer::buffer(size_t i, const std::string& name) {
  for (auto& [n, t] : state_[i]) {
    if (n == name) return t;
  }
  state_[i].emplace_back(name, zeros(params_[i].sizes(), params_[i].options()));
  return state_[i].back().second;
}

bool Optimizer::has_buffer(size_t i, const std::string& name) const {
  for (const auto& [n, t] : state_[i]) {
    if (n == name) return true;
  }
  return false;
}

namespace {
constexpr const char* kKindPrefix = "optimizer.";  // "optimizer.AdamW": which optimizer the state is for
}  // namespace

NamedTensors Optimizer::state_dict() const {
  NamedTensors out;
  // The kind of optimizer is part of the state (its key names it, as a checkpoint holds only tensors):
  // Adam's moments mean something else to AdamW, SGD has none.
  out.emplace_back(std::string(kKindPrefix) + name_, scalar_tensor(1, kInt64));
  out.emplace_back("step", scalar_tensor(steps_, kInt64));
  for (size_t i = 0; i < state_.size(); ++i) {
    for (const auto& [n, t] : state_[i]) out.emplace_back(fmt::format("{}.{}", i, n), t);
  }
  return out;
}

void Optimizer::load_state_dict(const NamedTensors& state) {
  std::vector<std::string> problems;
  std::vector<std::deque<std::pair<std::string, Tensor>>> next(params_.size());
  int64_t steps = -1;
  std::string kind;
  for (const auto& [name, t] : state) {
    if (name.rfind(kKindPrefix, 0) == 0) {
      kind = name.substr(std::string(kKindPrefix).size());
      continue;
    }
    if (name == "step") {
      steps = static_cast<int64_t>(t.item<double>());
      continue;
    }
    const auto dot = name.find('.');
    size_t i = 0;
    bool ok = dot != std::string::npos && dot > 0;
    if (ok) {
      try { i = std::stoul(name.substr(0, dot)); } catch (...) { ok = false; }
    }
    if (!ok || i >= params_.size()) {
      problems.push_back(fmt::format("unexpected key '{}' (optimizer has {} parameters)", name, params_.size()));
      continue;
    }
    if (t.sizes() != params_[i].sizes() || t.dtype() != params_[i].dtype()) {
      problems.push_back(fmt::format("'{}' is {} {} but parameter {} is {} {}", name, t.dtype(), shape_str(t.sizes()), i,
                                     params_[i].dtype(), shape_str(params_[i].sizes())));
      continue;
    }
    // The state lives on its parameter's device (a state read from a file is on the CPU), contiguous for
    // the fused kernels, and owned by the optimizer (never aliasing the caller's tensor).
    next[i].emplace_back(name.substr(dot + 1), clone(t.detach().to(params_[i].device())));
  }
  if (kind.empty()) {
    problems.push_back(fmt::format("missing key '{}{}' (the optimizer that wrote the state)", kKindPrefix, name_));
  } else if (kind != name_) {
    problems.push_back(fmt::format("the state was written by {} ('{}{}'); it cannot be loaded into {}", kind,
                                   kKindPrefix, kind, name_));
  }
  if (steps < 0) problems.push_back("missing key 'step'");
  FG_CHECK(problems.empty(), ValueError, "{}.load_state_dict: {} problem(s):\n  {}", name_, problems.size(),
           fmt::join(problems, "\n  "));
  steps_ = steps;
  state_ = std::move(next);
}

SGD::SGD(TensorList params, SGDOptions o) : Optimizer(std::move(params), o.lr, "SGD"), options(o) {
  FG_CHECK(o.momentum >= 0, ValueError, "SGD: momentum must be >= 0, got {}", o.momentum);
  FG_CHECK(!o.nesterov || (o.momentum > 0 && o.dampening == 0), ValueError,
           "SGD: nesterov needs momentum > 0 and dampening 0 (got momentum {}, dampening {})", o.momentum, o.dampening);
}

void SGD::step() {
  std::vector<OptimTensors> items;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (!p.grad().defined()) continue;
    OptimTensors it{p, p.grad(), Tensor(), Tensor(), false};
    if (options.momentum != 0) {
      it.fresh = !has_buffer(i, "momentum_buffer");
      it.state1 = buffer(i, "momentum_buffer");
    }
    items.push_back(std::move(it));
  }
  OptimStep s;
  s.kind = OptimKind::SGD;
  s.lr = lr_;
  s.weight_decay = options.weight_decay;
  s.momentum = options.momentum;
  s.dampening = options.dampening;
  s.nesterov = options.nesterov;
  try {
    fused_optim_step(items, s);  // checks every tensor before it writes any
  } catch (...) {
    // A refused step leaves no trace: a momentum buffer created for it must still be fresh next time.
    for (size_t i = 0, k = 0; i < params_.size(); ++i) {
      if (!params_[i].grad().defined()) continue;
      if (items[k++].fresh) std::erase_if(state_[i], [](const auto& e) { return e.first == "momentum_buffer"; });
    }
    throw;
  }
  ++steps_;
}

Adam::Adam(TensorList params, AdamOptions o, bool decoupled)
    : Optimizer(std::move(params), o.lr, decoupled ? "AdamW" : "Adam"), options(o), decoupled_(decoupled) {
  FG_CHECK(o.beta1 >= 0 && o.beta1 < 1 && o.beta2 >= 0 && o.beta2 < 1, ValueError,
           "{}: betas must be in [0, 1), got ({}, {})", name_, o.beta1, o.beta2);
  FG_CHECK(o.eps >= 0, ValueError, "{}: eps must be >= 0, got {}", name_, o.eps);
}

void Adam::step() {
  const int64_t t = steps_ + 1;
  const double bc1 = 1 - std::pow(options.beta1, static_cast<double>(t));
  const double bc2 = 1 - std::pow(options.beta2, static_cast<double>(t));
  std::vector<OptimTensors> items;
  for (size_t i = 0; i < params_.size(); ++i) {
    const Tensor& p = params_[i];
    if (!p.grad().defined()) continue;
    Tensor m = buffer(i, "exp_avg");
    Tensor v = buffer(i, "exp_avg_sq");
    items.push_back({p, p.grad(), m, v, false});
  }
  OptimStep s;
  s.kind = OptimKind::Adam;
  s.lr = lr_;
  s.weight_decay = options.weight_decay;
  s.beta1 = options.beta1;
  s.beta2 = options.beta2;
  s.eps = options.eps;
  s.step_size = lr_ / bc1;  // p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)
  s.sqrt_bc2 = std::sqrt(bc2);
  s.decoupled = decoupled_;
  fused_optim_step(items, s);
  steps_ = t;
}

AdamW::AdamW(TensorList params, AdamOptions o) : Adam(std::move(params), o, /*decoupled=*/true) {}

double clip_grad_norm_(const TensorList& params, double max_norm) {
  FG_CHECK(max_norm > 0, ValueError, "clip_grad_norm_: max_norm must be > 0, got {}", max_norm);
  TensorList grads;
  for (const auto& p : params) {
    if (p.grad().defined()) grads.push_back(p.grad());
  }
  // One fused sum of squares per (device, dtype) group: one host synchronisation for the whole model.
  const double total = std::sqrt(grads_sq_sum(grads));
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1) scale_grads_(grads, coef);
  return total;
}

double WarmupCosine::at(int64_t step) const {
  if (warmup_steps > 0 && step < warmup_steps) return base_lr * static_cast<double>(step + 1) / warmup_steps;
  if (step >= total_steps) return min_lr;
  const double span = std::max<int64_t>(1, total_steps - warmup_steps);
  const double progress = static_cast<double>(step - warmup_steps) / span;
  return min_lr + 0.5 * (base_lr - min_lr) * (1 + std::cos(M_PI * progress));
}

}  // namespace fg::nn
