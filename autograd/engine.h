// Runs the backward pass over the tape: an iterative (stack-free) topological execution, so graphs of
// hundreds of thousands of nodes do not overflow the call stack.
#pragma once
#include "flexgrad/autograd/node.h"

namespace fg {

// Backpropagates `grads` (one per root; undefined means ones for a one-element root) from `roots`.
// inputs, when not empty, restricts accumulation: gradients for those tensors are returned instead of
// being accumulated into .grad() (fg::grad semantics).
void run_backward(const TensorList& roots, const TensorList& grads, bool retain_graph);
TensorList grad(const TensorList& outputs, const TensorList& inputs, const TensorList& grad_outputs = {},
                bool retain_graph = false, bool allow_unused = false);

}  // namespace fg
