// Causal masks (see causal.h).
#include "flexgrad/attention/gallery/causal.h"

#include "flexgrad/attention/mask_mods.h"

namespace fg {

MaskMod causal_mask() {
  return [](Expr, Expr, Expr q, Expr kv) { return q >= kv; };
}

MaskMod prefix_lm_mask(int64_t prefix_length) {
  FG_CHECK(prefix_length >= 0, ValueError, "prefix_lm_mask: prefix_length must be >= 0, got {}", prefix_length);
  return or_masks(causal_mask(), MaskMod([prefix_length](Expr, Expr, Expr, Expr kv) { return kv < prefix_length; }));
}

}  // namespace fg
