// Losses. cross_entropy is one fused op (row max, logsumexp, picked logit and the smoothing term in a
// single pass; backward softmax - target in one more), because at a character vocabulary the logits are
// the largest activation of a small language model and a log_softmax + gather chain would walk them 4x.
#pragma once
#include <cstdint>

#include "flexgrad/tensor/tensor.h"

namespace fg {

enum class Reduction : uint8_t { None, Mean, Sum };

struct CrossEntropyOptions {
  int64_t ignore_index = -100;   // targets equal to it contribute nothing and are not counted by Mean
  double label_smoothing = 0.0;  // in [0, 1]: target = (1 - s) * one_hot + s / C
  Reduction reduction = Reduction::Mean;
};

// logits [N, C] (or [C]) floating, target [N] (or []) int64/int32 class indices in [0, C).
// Mean divides by the number of non-ignored targets (0 when all are ignored, as a sum of nothing).
Tensor cross_entropy(const Tensor& logits, const Tensor& target, const CrossEntropyOptions& options = {});
// Negative log likelihood of log-probabilities logp [N, C] (composite; differentiable in logp).
Tensor nll_loss(const Tensor& logp, const Tensor& target, int64_t ignore_index = -100,
                Reduction reduction = Reduction::Mean);
// Mean (or summed) squared error; shapes must be equal.
Tensor mse_loss(const Tensor& input, const Tensor& target, Reduction reduction = Reduction::Mean);

}  // namespace fg
