// ALiBi (see alibi.h).
#include "flexgrad/attention/gallery/alibi.h"

namespace fg {

ScoreMod alibi_score_mod(int64_t heads) {
  FG_CHECK(heads >= 1, ValueError, "alibi_score_mod: heads must be >= 1, got {}", heads);
  const double per_head = 8.0 / static_cast<double>(heads);
  return [per_head](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * per_head)); };
}

}  // namespace fg
