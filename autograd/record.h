// How a differentiable op puts itself on the tape, keeping forward and backward side by side:
//
//   Tensor out = mul_forward(a, b);
//   if (needs_grad({a, b})) {
//     SavedTensor sa = a, sb = b;
//     record("MulBackward", {a, b}, {out}, [sa, sb](const TensorList& g) {
//       return TensorList{g[0] * sb.unpack(), g[0] * sa.unpack()};
//     });
//   }
#pragma once
#include <initializer_list>
#include <string>

#include "flexgrad/autograd/autograd_meta.h"
#include "flexgrad/autograd/grad_mode.h"

namespace fg {

// True when grad mode is on and any defined input requires grad.
bool needs_grad(std::initializer_list<Tensor> inputs);
bool needs_grad(const TensorList& inputs);

// Records a LambdaNode named `name` with edges to `inputs` and makes `outputs` its outputs. backward gets
// one gradient per output and returns one per input (undefined where none). Returns the node.
std::shared_ptr<Node> record(std::string name, const TensorList& inputs, const TensorList& outputs, BackwardFn backward);

}  // namespace fg
