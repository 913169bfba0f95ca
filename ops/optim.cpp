// Fused optimizer updates: validation, grouping by (device, dtype) and the stub calls.
#include "flexgrad/ops/optim.h"

#include <map>
#include <tuple>

#include "flexgrad/autograd/grad_mode.h"

namespace fg {

FG_DEFINE_STUB(OptimStepFn, optim_step_stub);
FG_DEFINE_STUB(GradSqSumFn, grad_sq_sum_stub);
FG_DEFINE_STUB(GradScaleFn, grad_scale_stub);

namespace {

using GroupKey = std::tuple<int, int, int>;  // device type, device index, dtype
GroupKey key_of(const Tensor& t) {
  return {static_cast<int>(t.device().type), t.device().index, static_cast<int>(t.dtype())};
}

void check_state(const Tensor& p, const Tensor& s, size_t i, const char* what) {
  FG_CHECK(s.device() == p.device(), DeviceError, "optimizer step: parameter {} is on {} but its {} is on {}", i,
           p.device(), what, s.device());
  FG_CHECK(s.sizes() == p.sizes(), ShapeError, "optimizer step: parameter {} is {} but its {} is {}", i,
           shape_str(p.sizes()), what, shape_str(s.sizes()));
  FG_CHECK(s.dtype() == p.dtype(), DTypeError, "optimizer step: parameter {} is {} but its {} is {}", i, p.dtype(),
           what, s.dtype());
  FG_CHECK(s.is_contiguous(), ValueError, "optimizer step: the {} of parameter {} must be contiguous", what, i);
}

}  // namespace

void fused_optim_step(const std::vector<OptimTensors>& items, const OptimStep& step) {
  NoGradGuard ng;
  std::map<GroupKey, std::vector<OptimSlot>> groups;
  // Temporaries that must outlive the kernels: grads cast or made contiguous, contiguous copies of
  // strided parameters (written back after the step).
  std::vector<Tensor> keep;
  std::vector<std::pair<Tensor, Tensor>> write_back;  // (parameter, contiguous copy that was updated)
  for (size_t i = 0; i < items.size(); ++i) {
    const OptimTensors& it = items[i];
    const Tensor& p = it.param;
    FG_CHECK(p.defined() && p.is_floating_point(), DTypeError,
             "optimizer step: parameter {} must be a floating tensor, got {}", i, p.defined() ? dtype_name(p.dtype()) : "undefined");
    FG_CHECK(it.grad.defined(), ValueError, "optimizer step: parameter {} has no gradient", i);
    FG_CHECK(it.grad.device() == p.device(), DeviceError, "optimizer step: parameter {} is on {} but its grad is on {}", i,
             p.device(), it.grad.device());
    FG_CHECK(it.grad.sizes() == p.sizes(), ShapeError, "optimizer step: parameter {} is {} but its grad is {}", i,
             shape_str(p.sizes()), shape_str(it.grad.sizes()));
    const bool needs1 = step.kind == OptimKind::Adam || step.momentum != 0;
    const bool needs2 = step.kind == OptimKind::Adam;
    if (needs1) check_state(p, it.state1, i, step.kind == OptimKind::Adam ? "exp_avg" : "momentum_buffer");
    if (needs2) check_state(p, it.state2, i, "exp_avg_sq");
    if (p.numel() == 0) continue;
    Tensor g = it.grad.detach();
    if (g.dtype() != p.dtype()) g = g.to(p.dtype());
    if (!g.is_contiguous()) g = g.contiguous();
    keep.push_back(g);
    Tensor pc = p.detach();
    if (!pc.is_contiguous()) {
      pc = pc.contiguous();
      write_back.emplace_back(p, pc);
    }
    OptimSlot s;
    s.param = pc.data_ptr();
    s.grad = g.data_ptr();
    s.state1 = needs1 ? it.state1.data_ptr() : nullptr;
    s.state2 = needs2 ? it.state2.data_ptr() : nullptr;
    s.numel = p.numel();
    s.fresh = it.fresh;
    groups[key_of(p)].push_back(s);
  }
  for (const auto& [k, slots] : groups) {
    const Device dev(static_cast<DeviceType>(std::get<0>(k)), std::get<1>(k));
    optim_step_stub(dev, dev.index, static_cast<DType>(std::get<2>(k)), slots, step);
  }
  for (auto& [p, pc] : write_back) p.detach().copy_(pc);
  // The parameters and states were written through their data pointers: move their versions as an in-place
  // op would, so a tensor saved for backward before the step is reported as modified.
  for (const OptimTensors& it : items) {
    if (it.param.numel() == 0) continue;
    it.param.bump_version();
    if (it.state1.defined()) it.state1.bump_version();
    if (it.state2.defined()) it.state2.bump_version();
  }
}

namespace {
// Defined gradients grouped by (device, dtype), as contiguous tensors (`keep` holds copies made).
std::map<GroupKey, std::vector<GradSlot>> group_grads(const TensorList& grads, std::vector<Tensor>& keep,
                                                       bool for_write) {
  std::map<GroupKey, std::vector<GradSlot>> groups;
  for (size_t i = 0; i < grads.size(); ++i) {
    const Tensor& g = grads[i];
    if (!g.defined() || g.numel() == 0) continue;
    FG_CHECK(g.is_floating_point(), DTypeError, "gradient {} must be floating, got {}", i, g.dtype());
    Tensor c = g.detach();
    if (!c.is_contiguous()) {
      // A strided gradient (rare: a user's set_grad) is read from a copy; written in place it must be whole.
      FG_CHECK(!for_write, ValueError, "scale_grads_: gradient {} must be contiguous", i);
      c = c.contiguous();
      keep.push_back(c);
    }
    groups[key_of(c)].push_back({c.data_ptr(), c.numel()});
  }
  return groups;
}
}  // namespace

double grads_sq_sum(const TensorList& grads) {
  NoGradGuard ng;
  std::vector<Tensor> keep;
  double total = 0;
  for (const auto& [k, slots] : group_grads(grads, keep, false)) {
    const Device dev(static_cast<DeviceType>(std::get<0>(k)), std::get<1>(k));
    total += grad_sq_sum_stub(dev, dev.index, static_cast<DType>(std::get<2>(k)), slots);
  }
  return total;
}

void scale_grads_(const TensorList& grads, double coef) {
  NoGradGuard ng;
  std::vector<Tensor> keep;
  std::vector<Tensor> strided;
  TensorList whole;
  for (const auto& g : grads) {
    if (g.defined() && !g.is_contiguous()) strided.push_back(g);
    else whole.push_back(g);
  }
  for (const auto& [k, slots] : group_grads(whole, keep, true)) {
    const Device dev(static_cast<DeviceType>(std::get<0>(k)), std::get<1>(k));
    grad_scale_stub(dev, dev.index, static_cast<DType>(std::get<2>(k)), slots, coef);
  }
  for (const auto& g : whole) {
    if (g.defined() && g.numel() > 0) g.bump_version();
  }
  for (auto& g : strided) g.detach().mul_(coef);  // the op path (rare) keeps strided layouts correct
}

}  // namespace fg
