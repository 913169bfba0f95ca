// Optimizers over a list of parameters (as torch.optim): SGD (momentum, Nesterov, L2 weight decay),
// Adam (bias-corrected moments, L2 weight decay added to the gradient) and AdamW (decoupled weight
// decay: p -= lr * wd * p, not passed through the moments). Updates run without recording the tape.
// Parameters whose .grad() is undefined are skipped, as PyTorch does.
// Each step is fused (ops/optim.h): one multi-tensor kernel call per (device, dtype) group of parameters,
// whatever their number; every floating dtype is supported (half types compute in float). The state
// lives on its parameter's device, and load_state_dict puts it there whatever device the file's tensors
// are on, so a checkpoint written from the GPU resumes on the GPU (or the CPU).
#pragma once
#include <deque>
#include <string>
#include <vector>

#include "flexgrad/nn/module.h"

namespace fg::nn {

class Optimizer {
 public:
  explicit Optimizer(TensorList params, double lr, std::string name);
  virtual ~Optimizer() = default;
  virtual void step() = 0;
  void zero_grad();  // drops every gradient (set_to_none)
  double lr() const { return lr_; }
  void set_lr(double lr) { lr_ = lr; }
  int64_t steps() const { return steps_; }
  const TensorList& params() const { return params_; }
  // Per-parameter buffers by name ("0.exp_avg", "3.momentum_buffer") plus "step" and "optimizer.<kind>"
  // ("optimizer.AdamW"); restore with load_state_dict on an optimizer of the same kind built over the same
  // parameter list (kind, names, shapes and dtypes checked: ValueError listing every problem).
  NamedTensors state_dict() const;
  void load_state_dict(const NamedTensors& state);

 protected:
  // The buffer `name` of parameter i, created as zeros on first use.
  Tensor& buffer(size_t i, const std::string& name);
  bool has_buffer(size_t i, const std::string& name) const;
  TensorList params_;
  double lr_;
  int64_t steps_ = 0;
  std::string name_;
  // A deque per parameter: buffer() hands out references that must survive later insertions.
  std::vector<std::deque<std::pair<std::string, Tensor>>> state_;
};

struct SGDOptions {
  double lr = 1e-2;
  double momentum = 0;
  double dampening = 0;
  double weight_decay = 0;
  bool nesterov = false;
};

class SGD : public Optimizer {
 public:
  SGD(TensorList params, SGDOptions options);
  void step() override;
  SGDOptions options;
};

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;  // Adam: L2 in the gradient; AdamW: decoupled
};

class Adam : public Optimizer {
 public:
  Adam(TensorList params, AdamOptions options, bool decoupled_weight_decay = false);
  void step() override;
  AdamOptions options;

 private:
  bool decoupled_;
};

// AdamW is Adam with decoupled weight decay (default 0.01 as torch.optim.AdamW).
class AdamW : public Adam {
 public:
  AdamW(TensorList params, AdamOptions options);
};

// Scales all gradients so that their global L2 norm is at most max_norm; returns the norm before clipping.
// Fused: one sum-of-squares reduction per (device, dtype) group (one host synchronisation each, for the
// returned norm) and one scaling kernel call per group.
double clip_grad_norm_(const TensorList& params, double max_norm);

// Linear warmup from 0 to base_lr over warmup_steps, then cosine decay to min_lr at total_steps.
struct WarmupCosine {
  double base_lr;
  int64_t warmup_steps;
  int64_t total_steps;
  double min_lr = 0;
  double at(int64_t step) const;  // step counts from 0
};

}  // namespace fg::nn
