// Matrix products. CPU f32/f64 go through BLAS (OpenBLAS), CUDA through cuBLAS; low-precision inputs
// accumulate in f32. matmul follows torch.matmul's rules (1-D vectors, broadcast batch dims). Under an
// AutocastGuard (ops/autocast.h) float32 operands on its device type are cast to its dtype first.
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor matmul(const Tensor& a, const Tensor& b);
Tensor mm(const Tensor& a, const Tensor& b);   // [n,k] x [k,m]
Tensor bmm(const Tensor& a, const Tensor& b);  // [B,n,k] x [B,k,m]
// x @ weight^T + bias (bias may be undefined), the Linear layer's product.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor());

}  // namespace fg
