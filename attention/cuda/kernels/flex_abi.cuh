// The contract between generated mod code (attention/mod_codegen.h) and the FlexAttention kernel
// templates. Compiled by NVRTC at run time as the first part of every flex translation unit, so it
// includes no header at all: fixed-width types come from the built-in ones below.
//
// A translation unit is laid out as
//   1. this file (types, capture reads, the error flag, the capture-gradient sink interface)
//   2. the generated mods: fg_score_mod, fg_mask_mod, fg_dscore, fg_cap_grad (mod_codegen.h)
//   3. one kernel template (flex_forward.cuh, flex_backward.cuh, block_mask.cuh), configured by macros
// and every kernel is `extern "C"` so the host fetches it by name.
#pragma once

typedef long long fg_i64;
typedef unsigned long long fg_u64;

#ifndef FG_MAX_CAPTURES
#define FG_MAX_CAPTURES 8
#endif
#ifndef FG_MAX_RANK
#define FG_MAX_RANK 6
#endif

// fg::DType codes as stored in FgCapture::dtype (tensor/dtype.h order).
#define FG_DT_BOOL 0
#define FG_DT_INT32 1
#define FG_DT_INT64 2
#define FG_DT_FLOAT16 3
#define FG_DT_BFLOAT16 4
#define FG_DT_FLOAT32 5
#define FG_DT_FLOAT64 6

// One captured tensor, read in place: any rank, any strides (in elements), any supported dtype.
struct FgCapture {
  const void* data;
  fg_i64 sizes[FG_MAX_RANK];
  fg_i64 strides[FG_MAX_RANK];
  int ndim;
  int dtype;  // FG_DT_*
};

// Device-side error report: the first out-of-range captured read wins. The host reads it after the
// kernel and raises the IndexError the CPU raises (same capture, dim, index and size).
struct FgError {
  int flag;        // 0: no error; 1: captured index out of range
  int capture;     // slot
  int dim;
  int pad;
  fg_i64 index;    // the offending index
  fg_i64 size;     // the size of that dim
};

// Everything a generated mod reads besides (score, b, h, q_idx, kv_idx). Passed by value to kernels
// (it is a __grid_constant__-friendly POD) and by const reference to the mod functions.
struct FgModArgs {
  FgCapture caps[FG_MAX_CAPTURES];
  FgError* error;  // may be null when no captured read can go out of range
};

// Records an out-of-range read (first one only) and returns index 0 so the read stays in bounds.
__device__ __forceinline__ fg_i64 fg_bad_index(const FgModArgs& a, int cap, int dim, fg_i64 index) {
  if (a.error != nullptr && atomicCAS(&a.error->flag, 0, 1) == 0) {
    a.error->capture = cap;
    a.error->dim = dim;
    a.error->index = index;
    a.error->size = a.caps[cap].sizes[dim];
  }
  return 0;
}

// Python indexing of one dim: [-n, n) valid (negative wraps), anything else is an error.
__device__ __forceinline__ fg_i64 fg_wrap_index(const FgModArgs& a, int cap, int dim, fg_i64 i) {
  const fg_i64 n = a.caps[cap].sizes[dim];
  if (i < 0) i += n;
  if (i < 0 || i >= n) return fg_bad_index(a, cap, dim, i < 0 ? i - n : i);
  return i;
}

// Element `off` (in elements) of a capture, converted to double / int64 / bool by its stored dtype.
__device__ __forceinline__ float fg_bf16_to_float(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ float fg_f16_to_float(unsigned short x) {
  float f;
  asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
  return f;
}
__device__ __forceinline__ double fg_cap_load_f(const FgCapture& c, fg_i64 off) {
  switch (c.dtype) {
    case FG_DT_FLOAT32: return (double)((const float*)c.data)[off];
    case FG_DT_FLOAT64: return ((const double*)c.data)[off];
    case FG_DT_BFLOAT16: return (double)fg_bf16_to_float(((const unsigned short*)c.data)[off]);
    case FG_DT_FLOAT16: return (double)fg_f16_to_float(((const unsigned short*)c.data)[off]);
    case FG_DT_INT32: return (double)((const int*)c.data)[off];
    case FG_DT_INT64: return (double)((const fg_i64*)c.data)[off];
    default: return ((const unsigned char*)c.data)[off] ? 1.0 : 0.0;
  }
}
__device__ __forceinline__ fg_i64 fg_cap_load_i(const FgCapture& c, fg_i64 off) {
  switch (c.dtype) {
    case FG_DT_INT32: return ((const int*)c.data)[off];
    case FG_DT_INT64: return ((const fg_i64*)c.data)[off];
    case FG_DT_BOOL: return ((const unsigned char*)c.data)[off] ? 1 : 0;
    default: return (fg_i64)fg_cap_load_f(c, off);
  }
}

// The capture-gradient sink a kernel hands to fg_cap_grad: one call per (term, element) with the
// linear (row-major, contiguous) index into captured tensor `cap` and the value to add there.
// Kernels define their own sink type with this member:
//   __device__ void add(int cap, fg_i64 linear_index, double value) const;
// fg_cap_grad is a template over the sink type, so the accumulation policy (deterministic fixed-point
// or float atomics) belongs to the kernel, not to the generated code.
