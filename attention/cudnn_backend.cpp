// The cuDNN backend's kernel families (attention/cudnn_backend.h): defined here, filled for CUDA by
// attention/cuda/cudnn_sdpa.cpp when the build has cuDNN's header.
#include "flexgrad/attention/cudnn_backend.h"

namespace fg {

FG_DEFINE_STUB(CudnnSdpaForwardFn, cudnn_sdpa_forward_stub);
FG_DEFINE_STUB(CudnnSdpaBackwardFn, cudnn_sdpa_backward_stub);
FG_DEFINE_STUB(CudnnAvailableFn, cudnn_available_stub);
FG_DEFINE_STUB(CudnnPlanCheckFn, cudnn_plan_check_stub);
FG_DEFINE_STUB(CudnnDeviceArchFn, cudnn_device_arch_stub);

}  // namespace fg
