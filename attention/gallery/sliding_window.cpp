// Sliding-window masks (see sliding_window.h).
#include "flexgrad/attention/gallery/sliding_window.h"

namespace fg {

MaskMod sliding_window_mask(int64_t window) {
  FG_CHECK(window >= 0, ValueError, "sliding_window_mask: window must be >= 0, got {}", window);
  return [window](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= window); };
}

MaskMod dilated_sliding_window_mask(int64_t window, int64_t dilation) {
  FG_CHECK(window >= 0, ValueError, "dilated_sliding_window_mask: window must be >= 0, got {}", window);
  FG_CHECK(dilation >= 1, ValueError, "dilated_sliding_window_mask: dilation must be >= 1, got {}", dilation);
  return [window, dilation](Expr, Expr, Expr q, Expr kv) {
    Expr d = abs(q - kv);
    return (d <= window) & (d % dilation == 0);
  };
}

MaskMod global_sliding_window_mask(int64_t window, const Tensor& is_global) {
  FG_CHECK(window >= 0, ValueError, "global_sliding_window_mask: window must be >= 0, got {}", window);
  FG_CHECK(is_global.defined() && is_global.dim() == 1, ShapeError,
           "global_sliding_window_mask: is_global must be a 1-D tensor over the positions, got {}",
           is_global.defined() ? shape_str(is_global.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(is_global.dtype() == kBool, DTypeError, "global_sliding_window_mask: is_global must be bool, got {}",
           is_global.dtype());
  Captured g(is_global, "is_global");
  return [window, g](Expr, Expr, Expr q, Expr kv) { return (abs(q - kv) <= window) | Expr(g[q]) | Expr(g[kv]); };
}

}  // namespace fg
