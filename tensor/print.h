// PyTorch-like printing: nested brackets, aligned columns, "..." summarisation past 1000 elements, and a
// suffix with dtype (when not the default), device (when not CPU) and grad_fn / requires_grad.
#pragma once
#include <ostream>
#include <string>

#include "flexgrad/tensor/tensor.h"

namespace fg {

struct PrintOptions {
  int precision = 4;
  int64_t threshold = 1000;  // summarise tensors with more elements than this
  int64_t edgeitems = 3;     // items shown at each end of a summarised dim
  int64_t linewidth = 80;
};
void set_print_options(const PrintOptions& options);
const PrintOptions& print_options();

std::string to_string(const Tensor& t);
std::ostream& operator<<(std::ostream& os, const Tensor& t);

}  // namespace fg
