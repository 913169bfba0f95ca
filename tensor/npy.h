// NumPy .npy files (format versions 1.0, 2.0 and 3.0 read; 1.0 written, 2.0 when the header needs it).
// dtypes: bool, int32, int64, float16, float32, float64 (bfloat16 has no NumPy type and is refused).
// Fortran-order arrays load with the right strides; big-endian data is byte-swapped on load.
#pragma once
#include <string>

#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor load_npy(const std::string& path);          // IOError naming the path and what is wrong
void save_npy(const std::string& path, const Tensor& t);  // any device, any layout

}  // namespace fg
