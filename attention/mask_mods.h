// Mask-mod combinators, as torch.nn.attention.flex_attention's noop_mask / and_masks / or_masks, plus
// not_mask. They combine callables, so tracing the result gives one program with the combined
// expression (folded: and_masks(noop_mask, m) traces to m).
#pragma once
#include <vector>

#include "flexgrad/attention/expr.h"

namespace fg {

// Always true: attend everywhere (the default mask of flex_attention).
Expr noop_mask(Expr b, Expr h, Expr q_idx, Expr kv_idx);

// Intersection / union of any number of masks (and_masks() is all-true, or_masks() all-false).
MaskMod and_masks(std::vector<MaskMod> masks);
MaskMod or_masks(std::vector<MaskMod> masks);
template <class... M> MaskMod and_masks(M... masks) { return and_masks(std::vector<MaskMod>{MaskMod(masks)...}); }
template <class... M> MaskMod or_masks(M... masks) { return or_masks(std::vector<MaskMod>{MaskMod(masks)...}); }
// Complement.
MaskMod not_mask(MaskMod mask);

}  // namespace fg
