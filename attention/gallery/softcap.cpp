// Tanh soft-capping (see softcap.h).
#include "flexgrad/attention/gallery/softcap.h"

#include <cmath>

namespace fg {

ScoreMod tanh_softcap_score_mod(double cap) {
  FG_CHECK(std::isfinite(cap) && cap > 0, ValueError, "tanh_softcap_score_mod: cap must be finite and > 0, got {}", cap);
  return [cap](Expr s, Expr, Expr, Expr, Expr) { return cap * tanh(s / cap); };
}

}  // namespace fg
