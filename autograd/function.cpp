#include "autograd/function.h"

namespace fg {

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
