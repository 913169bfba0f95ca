// TEMPORARY link shim for test_attention while the op layer (ops/*.cpp) is not on this branch.
//
// tensor/factory.cpp calls Tensor::requires_grad_ (autograd/variable.cpp), which pulls in the autograd
// engine, which needs these op-layer functions. The attention IR and BlockMask never call them; the
// stubs only let the test binary link. Each block disables itself as soon as the file defining the
// real function exists (after merging main), so nothing here can shadow the real implementations.
// Delete this file after the merge.
#include "autograd/grad_arith.h"
#include "tensor/tensor.h"

#if !__has_include("ops/grad_arith.cpp")
namespace fg::autograd_arith {
Tensor add(const Tensor&, const Tensor&) { FG_FAIL(NotImplementedError, "autograd_arith::add: op layer not linked"); }
Tensor ones_like(const Tensor&) { FG_FAIL(NotImplementedError, "autograd_arith::ones_like: op layer not linked"); }
Tensor clone_contiguous(const Tensor&) {
  FG_FAIL(NotImplementedError, "autograd_arith::clone_contiguous: op layer not linked");
}
}  // namespace fg::autograd_arith
#endif

#if !__has_include("ops/tensor_methods.cpp")
namespace fg {
Tensor Tensor::to(DType) const { FG_FAIL(NotImplementedError, "Tensor::to: op layer not linked"); }
}  // namespace fg
#endif
