// DispatchStub lives in the tensor layer (tensor/dispatch.h) so tensor-level kernels (random fills) can use
// it too; the op layer keeps including this header.
#pragma once
#include "flexgrad/tensor/dispatch.h"
