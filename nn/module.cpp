// nn::Module: registration, traversal, conversion, state dicts and printing.
#include "flexgrad/nn/module.h"

#include <fmt/format.h>

#include <set>

#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/ops/elementwise.h"

namespace fg::nn {

Module::Module(std::string type_name) : type_name_(std::move(type_name)) {}

void Module::check_new_name(const std::string& name, const char* what) const {
  FG_CHECK(!name.empty() && name.find('.') == std::string::npos, ValueError,
           "{}.register_{}: name '{}' must be non-empty and contain no '.'", type_name_, what, name);
  auto taken = [&](const auto& v) {
    for (const auto& s : v) if (s.name == name) return true;
    return false;
  };
  bool child = false;
  for (const auto& c : children_) child |= c.first == name;
  FG_CHECK(!taken(params_) && !taken(buffers_) && !child, ValueError,
           "{}.register_{}: name '{}' is already registered", type_name_, what, name);
}

void Module::register_parameter(const std::string& name, Tensor* slot, bool requires_grad) {
  check_new_name(name, "parameter");
  FG_CHECK(slot && slot->defined(), ValueError, "{}.register_parameter: '{}' is an undefined tensor", type_name_, name);
  // A parameter is a leaf: cut any history the initialiser left and track gradients from here.
  *slot = slot->detach();
  if (requires_grad && slot->is_floating_point()) slot->requires_grad_(true);
  params_.push_back({name, slot, true});
}

void Module::register_buffer(const std::string& name, Tensor* slot, bool persistent) {
  check_new_name(name, "buffer");
  FG_CHECK(slot && slot->defined(), ValueError, "{}.register_buffer: '{}' is an undefined tensor", type_name_, name);
  *slot = slot->detach();
  buffers_.push_back({name, slot, persistent});
}

void Module::add_child(const std::string& name, std::shared_ptr<Module> module) {
  check_new_name(name, "module");
  FG_CHECK(module != nullptr, ValueError, "{}.register_module: '{}' is null", type_name_, name);
  module->train(training_);
  children_.emplace_back(name, std::move(module));
}

void Module::collect(const std::string& prefix, bool params, bool buffers, bool persistent_only, bool recurse,
                     std::vector<std::pair<std::string, Tensor*>>& out) const {
  if (params) for (const auto& s : params_) out.emplace_back(prefix + s.name, s.tensor);
  if (buffers) {
    for (const auto& s : buffers_) {
      if (!persistent_only || s.persistent) out.emplace_back(prefix + s.name, s.tensor);
    }
  }
  if (!recurse) return;
  for (const auto& [name, child] : children_) {
    child->collect(prefix + name + ".", params, buffers, persistent_only, true, out);
  }
}

NamedTensors Module::named_parameters(bool recurse) const {
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, false, false, recurse, slots);
  NamedTensors out;
  for (auto& [n, t] : slots) out.emplace_back(n, *t);
  return out;
}

NamedTensors Module::named_buffers(bool recurse) const {
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", false, true, false, recurse, slots);
  NamedTensors out;
  for (auto& [n, t] : slots) out.emplace_back(n, *t);
  return out;
}

TensorList Module::parameters(bool recurse) const {
  TensorList out;
  for (auto& [n, t] : named_parameters(recurse)) out.push_back(t);
  return out;
}

std::vector<std::pair<std::string, std::shared_ptr<Module>>> Module::named_modules() {
  std::vector<std::pair<std::string, std::shared_ptr<Module>>> out{{"", shared_from_this()}};
  for (const auto& [name, child] : children_) {
    for (auto& [sub, m] : child->named_modules()) out.emplace_back(sub.empty() ? name : name + "." + sub, m);
  }
  return out;
}

int64_t Module::num_parameters() const {
  int64_t n = 0;
  for (const auto& t : parameters()) n += t.numel();
  return n;
}

Tensor& Module::get(const std::string& name) {
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, true, false, true, slots);
  std::vector<std::string> names;
  for (auto& [n, t] : slots) {
    if (n == name) return *t;
    names.push_back(n);
  }
  FG_FAIL(ValueError, "{}.get: no parameter or buffer '{}'; have: {}", type_name_, name, fmt::join(names, ", "));
}

void Module::train(bool on) {
  training_ = on;
  for (auto& [n, c] : children_) c->train(on);
}

void Module::to(DType dtype) {
  FG_CHECK(is_floating(dtype), DTypeError, "{}.to: target dtype must be floating, got {}", type_name_, dtype);
  NoGradGuard ng;
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, false, false, true, slots);
  for (auto& [n, t] : slots) {
    if (!t->is_floating_point() || t->dtype() == dtype) continue;
    const bool rg = t->requires_grad();
    *t = cast(*t, dtype).detach();
    if (rg) t->requires_grad_(true);
  }
  slots.clear();
  collect("", false, true, false, true, slots);
  for (auto& [n, t] : slots) {
    if (t->is_floating_point()) *t = cast(*t, dtype).detach();
  }
}

void Module::to(Device device) {
  NoGradGuard ng;
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, true, false, true, slots);
  for (auto& [n, t] : slots) {
    if (t->device() == device) continue;
    const bool rg = t->requires_grad();
    const Tensor grad = t->grad();
    *t = to_device(*t, device).detach();
    if (rg) t->requires_grad_(true);
    if (grad.defined()) t->set_grad(to_device(grad, device));
  }
}

void Module::zero_grad() {
  for (auto& t : parameters()) {
    if (t.grad().defined()) t.set_grad(Tensor());
  }
}

NamedTensors Module::state_dict() const {
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, true, true, true, slots);
  NamedTensors out;
  for (auto& [n, t] : slots) out.emplace_back(n, t->detach());
  return out;
}

void Module::load_state_dict(const NamedTensors& state, bool strict) {
  std::vector<std::pair<std::string, Tensor*>> slots;
  collect("", true, true, true, true, slots);
  std::map<std::string, const Tensor*> given;
  for (const auto& [n, t] : state) given[n] = &t;
  std::vector<std::string> problems;
  std::set<std::string> seen;
  for (auto& [n, slot] : slots) {
    auto it = given.find(n);
    if (it == given.end()) {
      if (strict) problems.push_back(fmt::format("missing key '{}' (expected {} {})", n, slot->dtype(), shape_str(slot->sizes())));
      continue;
    }
    seen.insert(n);
    const Tensor& src = *it->second;
    if (src.sizes() != slot->sizes()) {
      problems.push_back(fmt::format("shape mismatch for '{}': checkpoint has {}, model expects {}", n,
                                     shape_str(src.sizes()), shape_str(slot->sizes())));
    }
    if (src.dtype() != slot->dtype()) {
      problems.push_back(fmt::format("dtype mismatch for '{}': checkpoint has {}, model expects {}", n, src.dtype(),
                                     slot->dtype()));
    }
  }
  if (strict) {
    for (const auto& [n, t] : state) {
      if (!seen.count(n)) problems.push_back(fmt::format("unexpected key '{}' ({} {})", n, t.dtype(), shape_str(t.sizes())));
    }
  }
  FG_CHECK(problems.empty(), ValueError, "{}.load_state_dict: {} problem(s):\n  {}", type_name_, problems.size(),
           fmt::join(problems, "\n  "));
  NoGradGuard ng;
  for (auto& [n, slot] : slots) {
    auto it = given.find(n);
    // The data land on the registered tensor's device (a checkpoint read from a file is on the CPU).
    if (it != given.end()) slot->copy_(it->second->to(slot->device()));
  }
}

namespace {
std::string count_str(int64_t n) {
  if (n >= 1000000) return fmt::format("{:.2f}M", n / 1e6);
  if (n >= 1000) return fmt::format("{:.1f}K", n / 1e3);
  return std::to_string(n);
}
}  // namespace

void Module::print(std::string& out, const std::string& name, int indent) const {
  const std::string pad(indent * 2, ' ');
  out += pad;
  if (!name.empty()) out += "(" + name + "): ";
  out += type_name_ + "(" + extra_repr() + ")";
  out += fmt::format("  [{} params]\n", count_str(num_parameters()));
  for (const auto& [n, c] : children_) c->print(out, n, indent + 1);
}

std::string Module::to_string() const {
  std::string out;
  print(out, "", 0);
  return out;
}

}  // namespace fg::nn
