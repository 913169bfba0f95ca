// Batchify (see batchify.h).
#include "flexgrad/attention/gallery/batchify.h"

namespace fg {

MaskMod batchify_mask(int64_t n, MaskMod inner) {
  FG_CHECK(n >= 1, ValueError, "batchify_mask: n must be >= 1, got {}", n);
  FG_CHECK(static_cast<bool>(inner), ValueError, "batchify_mask: the inner mask is an empty callable");
  return [n, inner = std::move(inner)](Expr b, Expr h, Expr q, Expr kv) {
    return (floor_div(q, n) == floor_div(kv, n)) & inner(b, h, q % n, kv % n);
  };
}

}  // namespace fg
