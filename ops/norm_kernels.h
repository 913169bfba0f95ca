// Kernel family behind ops/norm.h: contiguous [rows, n] in float32/float64; the weight/bias pointers may
// be null (no affine). rms selects RMSNorm (no centring, no bias).
#pragma once
#include "flexgrad/ops/dispatch.h"
#include "flexgrad/tensor/dtype.h"

namespace fg {

struct NormArgs {
  int64_t rows = 0, n = 0;
  double eps = 0;
  bool rms = false;
  DType dtype = kFloat32;
  const void* x = nullptr;
  const void* weight = nullptr;
  const void* bias = nullptr;
};

// y = normalised x (* weight + bias); mean[r] (layer norm only) and rstd[r] kept for backward.
using NormFwdFn = void (*)(const NormArgs& a, void* y, void* mean, void* rstd);
// gx [rows, n]; gw / gb [n] (null when not wanted) summed over rows.
using NormBwdFn = void (*)(const NormArgs& a, const void* gy, const void* mean, const void* rstd, void* gx, void* gw,
                           void* gb);
FG_DECLARE_STUB(NormFwdFn, norm_fwd_stub);
FG_DECLARE_STUB(NormBwdFn, norm_bwd_stub);

}  // namespace fg
