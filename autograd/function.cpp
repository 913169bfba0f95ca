#include "flexgrad/autograd/function.h"

#include <cxxabi.h>

#include <cstdlib>
#include <memory>

namespace fg {

std::string function_node_name(const std::type_info& type) {
  int status = 0;
  std::unique_ptr<char, decltype(&std::free)> name(abi::__cxa_demangle(type.name(), nullptr, nullptr, &status), &std::free);
  std::string full = status == 0 && name ? name.get() : type.name();
  size_t colon = full.rfind("::");  // drop namespaces: fg::(anonymous namespace)::CubeFn -> CubeFn
  return colon == std::string::npos ? full : full.substr(colon + 2);
}

void FunctionCtx::save_for_backward(const TensorList& tensors) {
  saved_.clear();
  for (const auto& t : tensors) saved_.emplace_back(t);
}

TensorList FunctionCtx::saved_tensors() const {
  TensorList out;
  for (const auto& s : saved_) out.push_back(s.unpack());
  return out;
}

}  // namespace fg
