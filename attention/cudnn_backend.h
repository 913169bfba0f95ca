// The cuDNN backend's kernel families (FlexBackend::Cudnn): cuDNN's fused SDPA forward and backward graphs for a
// call lower_to_cudnn (attention/cudnn_lowering.h) accepted. Registered for CUDA by attention/cuda/cudnn_sdpa.cpp
// when the build found cuDNN's headers; absent otherwise (flex_attention then raises NotImplementedError).
#pragma once
#include "flexgrad/attention/cudnn_lowering.h"
#include "flexgrad/tensor/dispatch.h"
#include "flexgrad/tensor/tensor.h"

namespace fg {

// Tensors as the graphs read them: q [B, Hq, Lq, E], k [B, Hkv, Lkv, E], v [B, Hkv, Lkv, Ev] with unit last
// stride; out [B, Hq, Lq, Ev] and stats (the natural-log lse, float32 [B, Hq, Lq]) contiguous; bias (when
// the spec has one) [Bb, Hb, Lq, Lkv] contiguous in q's dtype (Bb in {1, B}, Hb in {1, Hq}); slopes float32
// [Hq] for ALiBi.
struct CudnnSdpaTensors {
  Tensor q, k, v, out, stats, bias, slopes;
  double scale = 1.0;
};

// dq, dk, dv like q, k, v (contiguous); dbias like bias when the spec's bias is learnable.
struct CudnnSdpaGrads {
  Tensor dout, dq, dk, dv, dbias;
};

using CudnnSdpaForwardFn = void (*)(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t);
using CudnnSdpaBackwardFn = void (*)(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const CudnnSdpaGrads& g);
// Empty when cuDNN can run on `device`, else why not (library not loadable, version too old).
using CudnnAvailableFn = std::string (*)(Device device);

FG_DECLARE_STUB(CudnnSdpaForwardFn, cudnn_sdpa_forward_stub);
FG_DECLARE_STUB(CudnnSdpaBackwardFn, cudnn_sdpa_backward_stub);
FG_DECLARE_STUB(CudnnAvailableFn, cudnn_available_stub);

}  // namespace fg
