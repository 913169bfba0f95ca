// The whole public API of flexgrad in one include: #include <flexgrad/flexgrad.h>.
// Installed as <prefix>/include/flexgrad/flexgrad.h; in the build tree it is reached through the same
// flexgrad/ prefix (CMakeLists.txt). Kernel-family headers (*_kernels.h), backends (cpu/, cuda/) and the
// NVRTC templates are internal and not listed here; each header below can also be included on its own.
#pragma once

// tensor/: dtypes, Half/BFloat16, devices, errors, Tensor, factories, RNG, printing, .npy
#include "flexgrad/tensor/tensor.h"
#include "flexgrad/tensor/half.h"
#include "flexgrad/tensor/random.h"
#include "flexgrad/tensor/print.h"
#include "flexgrad/tensor/npy.h"
// The CUDA backend's toolkit-free API (allocator statistics, streams, pinned memory, TF32): declared only
// when the library was built with CUDA (flexgrad::flexgrad then defines FLEXGRAD_WITH_CUDA for its users).
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

// autograd/: the tape, backward, no_grad, custom functions, gradcheck
#include "flexgrad/autograd/engine.h"
#include "flexgrad/autograd/function.h"
#include "flexgrad/autograd/grad_mode.h"
#include "flexgrad/autograd/gradcheck.h"

// ops/: differentiable ops (ops.h gathers the general ones) and the fused ones of the nn layers
#include "flexgrad/ops/ops.h"
#include "flexgrad/ops/activation.h"
#include "flexgrad/ops/autocast.h"
#include "flexgrad/ops/dropout.h"
#include "flexgrad/ops/loss.h"
#include "flexgrad/ops/norm.h"
#include "flexgrad/ops/optim.h"
#include "flexgrad/ops/rotary.h"

// attention/: Expr, BlockMask, mask combinators, flex_attention (+ its reference path), PagedAttention
#include "flexgrad/attention/expr.h"
#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/flex_reference.h"
#include "flexgrad/attention/paged_attention.h"
// attention/gallery/: ready-made masks and score mods (attention-gym's catalogue) and the registry by name
#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/batchify.h"
#include "flexgrad/attention/gallery/block_diffusion.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/document.h"
#include "flexgrad/attention/gallery/graphormer.h"
#include "flexgrad/attention/gallery/natten.h"
#include "flexgrad/attention/gallery/registry.h"
#include "flexgrad/attention/gallery/sandwich.h"
#include "flexgrad/attention/gallery/sliding_window.h"
#include "flexgrad/attention/gallery/softcap.h"

// nn/: modules, optimizers, KV caches, safetensors checkpoints
#include "flexgrad/nn/nn.h"
