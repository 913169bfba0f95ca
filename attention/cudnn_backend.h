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

// dq, dk, dv like q, k, v (contiguous); dbias like bias when the spec's bias is learnable. deterministic
// (FlexKernelOptions::deterministic): bit-identical reruns: dQ written directly (the graph cudnn-frontend's
// set_deterministic_algorithm gives on Hopper, no float dQ accumulator) and only engines without cuDNN's
// nondeterministic numerical note; NotImplementedError when none remains.
struct CudnnSdpaGrads {
  Tensor dout, dq, dk, dv, dbias;
  bool deterministic = true;
};

using CudnnSdpaForwardFn = void (*)(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t);
using CudnnSdpaBackwardFn = void (*)(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, const CudnnSdpaGrads& g);
// Empty when cuDNN can run on `device`, else why not (library not loadable, version too old).
using CudnnAvailableFn = std::string (*)(Device device);
// Empty when the forward plan for `t` builds and, with `backward`, the backward plan for contiguous gradients (with
// dBias when `dbias`, deterministic or not) too; else the NotImplementedError message the run would raise. The
// plans are cached, so the run that follows builds nothing. Auto asks this before it picks cuDNN.
using CudnnPlanCheckFn = std::string (*)(const CudnnSdpaSpec& spec, const CudnnSdpaTensors& t, bool backward,
                                         bool dbias, bool deterministic);

FG_DECLARE_STUB(CudnnSdpaForwardFn, cudnn_sdpa_forward_stub);
FG_DECLARE_STUB(CudnnSdpaBackwardFn, cudnn_sdpa_backward_stub);
FG_DECLARE_STUB(CudnnAvailableFn, cudnn_available_stub);
FG_DECLARE_STUB(CudnnPlanCheckFn, cudnn_plan_check_stub);
// The device's NVRTC target ("sm_90a" on Hopper, else "sm_XY"): Auto's rule was measured on sm_90a only.
using CudnnDeviceArchFn = std::string (*)(Device device);
FG_DECLARE_STUB(CudnnDeviceArchFn, cudnn_device_arch_stub);

}  // namespace fg
