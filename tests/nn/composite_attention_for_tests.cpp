// TEST-ONLY stand-in for fg::flex_attention while its kernels are not in the tree yet: a plain
// matmul + masked softmax composite (mask from the BlockMask's traced mask_mod, no score_mod). It
// compiles only when attention/flex_kernels.h (which arrives with the real kernels) is absent, so the
// real implementation takes over in test_nn as soon as it is merged. The shipped layer never sees this.
#if !__has_include("attention/flex_kernels.h")
#include <cmath>

#include "attention/flex_attention.h"
#include "ops/ops.h"

namespace fg {

FlexAttentionResult flex_attention(const Tensor& q, const Tensor& k_in, const Tensor& v_in,
                                   const FlexAttentionOptions& o) {
  FG_CHECK(!o.score_mod, NotImplementedError, "test composite attention: score_mod is not supported");
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), E = q.size(3), Hkv = k_in.size(1), Lkv = k_in.size(2);
  Tensor k = k_in, v = v_in;
  if (Hq != Hkv) {
    FG_CHECK(o.enable_gqa, ValueError, "test composite attention: Hq != Hkv needs enable_gqa");
    const int64_t g = Hq / Hkv;
    k = reshape(expand(unsqueeze(k, 2), {k.size(0), Hkv, g, Lkv, E}), {k.size(0), Hq, Lkv, E});
    v = reshape(expand(unsqueeze(v, 2), {v.size(0), Hkv, g, Lkv, v.size(3)}), {v.size(0), Hq, Lkv, v.size(3)});
  }
  const double scale = o.scale ? *o.scale : 1.0 / std::sqrt(static_cast<double>(E));
  Tensor s = matmul(q, transpose(k, -1, -2)) * scale;
  if (o.block_mask) {
    const BlockMask& bm = *o.block_mask;
    const int64_t mb = bm.batch(), mh = bm.heads();
    Tensor allowed = empty({mb, mh, Lq, Lkv}, kBool);
    for (int64_t b = 0; b < mb; ++b)
      for (int64_t h = 0; h < mh; ++h)
        for (int64_t i = 0; i < Lq; ++i)
          for (int64_t j = 0; j < Lkv; ++j) allowed.set_at({b, h, i, j}, bm.mask_program->evaluate(b, h, i, j) != 0);
    s = masked_fill(s, logical_not(allowed), -INFINITY);
  }
  (void)B;
  return {matmul(softmax(s, -1), v), Tensor(), Tensor()};
}

}  // namespace fg
#endif
