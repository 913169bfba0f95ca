// Mask-mod combinators (see mask_mods.h).
#include "flexgrad/attention/mask_mods.h"

namespace fg {

Expr noop_mask(Expr, Expr, Expr, Expr) { return Expr(true); }

namespace {
void check_masks(const std::vector<MaskMod>& masks, const char* who) {
  for (size_t i = 0; i < masks.size(); ++i)
    FG_CHECK(static_cast<bool>(masks[i]), ValueError, "{}: mask {} of {} is an empty callable", who, i, masks.size());
}
}  // namespace

MaskMod and_masks(std::vector<MaskMod> masks) {
  check_masks(masks, "and_masks");
  return [masks = std::move(masks)](Expr b, Expr h, Expr q, Expr kv) {
    Expr r = true;
    for (const MaskMod& m : masks) r = r & m(b, h, q, kv);
    return r;
  };
}

MaskMod or_masks(std::vector<MaskMod> masks) {
  check_masks(masks, "or_masks");
  return [masks = std::move(masks)](Expr b, Expr h, Expr q, Expr kv) {
    Expr r = false;
    for (const MaskMod& m : masks) r = r | m(b, h, q, kv);
    return r;
  };
}

MaskMod not_mask(MaskMod mask) {
  FG_CHECK(static_cast<bool>(mask), ValueError, "not_mask: the mask is an empty callable");
  return [mask = std::move(mask)](Expr b, Expr h, Expr q, Expr kv) { return !mask(b, h, q, kv); };
}

}  // namespace fg
