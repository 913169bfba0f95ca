// The contract between generated mod code (attention/mod_codegen.h) and the FlexAttention kernel
// templates. Compiled by NVRTC at run time as the first part of every flex translation unit, so it
// includes no header at all: fixed-width types come from the built-in ones below.
//
// A translation unit is laid out as
//   1. this file (types, capture reads, the error flag, the capture-gradient sink interface)
//   2. the generated mods: fg_score_mod, fg_mask_mod (and their row / column / element parts),
//      fg_dscore, fg_score_elem_dscore (the modified score and its derivative in one pass), fg_cap_grad
//      (mod_codegen.h)
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

// Device-side error report: the first error wins. The host reads it after the kernel and raises what
// the CPU raises for the same values:
//   flag 1 FG_ERR_INDEX        captured index out of range: IndexError (capture slot, dim, index, size)
//   flag 2 FG_ERR_INT_DIV_ZERO integer // or % by zero: ValueError; capture -1, dim 0 for `//` and 1 for
//                              `%`, index = the dividend
//   flag 3 FG_ERR_NEG_POW      integer to a negative power: ValueError; capture -1, index = the base,
//                              size = the exponent
// (the messages are throw_capture_index_error / throw_int_division_by_zero / throw_negative_int_power of
// attention/mod_program.h and attention/op_semantics.h).
#define FG_ERR_INDEX 1
#define FG_ERR_INT_DIV_ZERO 2
#define FG_ERR_NEG_POW 3
struct FgError {
  int flag;        // 0: no error, else FG_ERR_*
  int capture;     // slot (-1 for integer-op errors)
  int dim;
  int pad;
  fg_i64 index;    // the offending index (or operand)
  fg_i64 size;     // the size of that dim (or the exponent)
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

// Integer-op errors (see FgError): recorded once, and the op yields 0 so the kernel carries on safely.
__device__ __forceinline__ fg_i64 fg_int_error(const FgModArgs& a, int flag, int dim, fg_i64 v, fg_i64 w) {
  if (a.error != nullptr && atomicCAS(&a.error->flag, 0, flag) == 0) {
    a.error->capture = -1;
    a.error->dim = dim;
    a.error->index = v;
    a.error->size = w;
  }
  return 0;
}

// ---- The op table's semantics (attention/op_semantics.h) for the generated code. Ints are 64-bit and
// wrap; `//` and `%` are Python's; float -> int truncates, saturates and maps NaN to 0.
__device__ __forceinline__ fg_i64 fg_add_i(fg_i64 x, fg_i64 y) { return (fg_i64)((fg_u64)x + (fg_u64)y); }
__device__ __forceinline__ fg_i64 fg_sub_i(fg_i64 x, fg_i64 y) { return (fg_i64)((fg_u64)x - (fg_u64)y); }
__device__ __forceinline__ fg_i64 fg_mul_i(fg_i64 x, fg_i64 y) { return (fg_i64)((fg_u64)x * (fg_u64)y); }
__device__ __forceinline__ fg_i64 fg_neg_i(fg_i64 x) { return (fg_i64)(0ULL - (fg_u64)x); }
__device__ __forceinline__ fg_i64 fg_abs_i(fg_i64 x) { return x < 0 ? fg_neg_i(x) : x; }
__device__ __forceinline__ fg_i64 fg_min_i(fg_i64 x, fg_i64 y) { return x < y ? x : y; }
__device__ __forceinline__ fg_i64 fg_max_i(fg_i64 x, fg_i64 y) { return x > y ? x : y; }
__device__ __forceinline__ fg_i64 fg_floordiv_i(const FgModArgs& a, fg_i64 x, fg_i64 y) {
  if (y == 0) return fg_int_error(a, FG_ERR_INT_DIV_ZERO, 0, x, 0);
  if (y == -1) return fg_neg_i(x);  // INT64_MIN / -1 overflows
  fg_i64 q = x / y;
  if ((x % y != 0) && ((x < 0) != (y < 0))) --q;
  return q;
}
__device__ __forceinline__ fg_i64 fg_mod_i(const FgModArgs& a, fg_i64 x, fg_i64 y) {
  if (y == 0) return fg_int_error(a, FG_ERR_INT_DIV_ZERO, 1, x, 0);
  if (y == -1) return 0;
  fg_i64 r = x % y;
  if (r != 0 && ((r < 0) != (y < 0))) r += y;
  return r;
}
__device__ __forceinline__ fg_i64 fg_pow_i(const FgModArgs& a, fg_i64 x, fg_i64 y) {
  if (y < 0) return fg_int_error(a, FG_ERR_NEG_POW, 0, x, y);
  fg_u64 r = 1, b = (fg_u64)x;
  while (y) {
    if (y & 1) r *= b;
    b *= b;
    y >>= 1;
  }
  return (fg_i64)r;
}
// torch.floor_divide / torch.remainder on floats.
__device__ __forceinline__ float fg_floordiv_f(float x, float y) {
  if (y == 0.0f) return x / y;
  const float m = fmodf(x, y);
  float d = (x - m) / y;
  if (m != 0.0f && ((y < 0.0f) != (m < 0.0f))) d -= 1.0f;
  float f = floorf(d);
  if (d - f > 0.5f) f += 1.0f;
  return d == 0.0f ? copysignf(0.0f, x / y) : f;
}
__device__ __forceinline__ double fg_floordiv_f(double x, double y) {
  if (y == 0.0) return x / y;
  const double m = fmod(x, y);
  double d = (x - m) / y;
  if (m != 0.0 && ((y < 0.0) != (m < 0.0))) d -= 1.0;
  double f = floor(d);
  if (d - f > 0.5) f += 1.0;
  return d == 0.0 ? copysign(0.0, x / y) : f;
}
__device__ __forceinline__ float fg_mod_f(float x, float y) {
  float r = fmodf(x, y);
  if (r != 0.0f && ((r < 0.0f) != (y < 0.0f))) r += y;
  return r;
}
__device__ __forceinline__ double fg_mod_f(double x, double y) {
  double r = fmod(x, y);
  if (r != 0.0 && ((r < 0.0) != (y < 0.0))) r += y;
  return r;
}
template <class T> __device__ __forceinline__ T fg_min_f(T x, T y) { return (x < y || x != x) ? x : y; }
template <class T> __device__ __forceinline__ T fg_max_f(T x, T y) { return (x > y || x != x) ? x : y; }
__device__ __forceinline__ fg_i64 fg_f2i(double x) {
  if (x != x) return 0;
  if (x >= 9223372036854775808.0) return (fg_i64)0x7fffffffffffffffULL;
  if (x <= -9223372036854775808.0) return (fg_i64)0x8000000000000000ULL;
  return (fg_i64)x;
}
__device__ __forceinline__ fg_i64 fg_f2i(float x) { return fg_f2i((double)x); }

// Element `off` (in elements) of a capture, converted to double / int64 / bool by its stored dtype.
__device__ __forceinline__ float fg_bf16_to_float(unsigned short x) { return __uint_as_float(((unsigned)x) << 16); }
__device__ __forceinline__ float fg_f16_to_float(unsigned short x) {
  float f;
  asm("{ .reg .f16 h; mov.b16 h, %1; cvt.f32.f16 %0, h; }" : "=f"(f) : "h"(x));
  return f;
}
// Element `off` (in elements) of a capture whose stored dtype is `dt` (FG_DT_*, a constant in the
// generated code, so the switch folds away), read through the read-only data cache (captures are not
// written while a kernel runs) and converted to double / int64.
__device__ __forceinline__ double fg_cap_load_f(const FgCapture& c, int dt, fg_i64 off) {
  switch (dt) {
    case FG_DT_FLOAT32: return (double)__ldg((const float*)c.data + off);
    case FG_DT_FLOAT64: return __ldg((const double*)c.data + off);
    case FG_DT_BFLOAT16: return (double)fg_bf16_to_float(__ldg((const unsigned short*)c.data + off));
    case FG_DT_FLOAT16: return (double)fg_f16_to_float(__ldg((const unsigned short*)c.data + off));
    case FG_DT_INT32: return (double)__ldg((const int*)c.data + off);
    case FG_DT_INT64: return (double)__ldg((const long long*)c.data + off);
    default: return __ldg((const unsigned char*)c.data + off) ? 1.0 : 0.0;
  }
}
__device__ __forceinline__ fg_i64 fg_cap_load_i(const FgCapture& c, int dt, fg_i64 off) {
  switch (dt) {
    case FG_DT_INT32: return __ldg((const int*)c.data + off);
    case FG_DT_INT64: return __ldg((const long long*)c.data + off);
    case FG_DT_BOOL: return __ldg((const unsigned char*)c.data + off) ? 1 : 0;
    default: return (fg_i64)fg_cap_load_f(c, dt, off);
  }
}

// tanh as the op table spells it under FlexKernelOptions::approx_math (cuda_f32_approx): the MUFU instruction,
// max relative error about 2^-11 (PTX ISA, tanh.approx.f32), one instruction where tanhf is a dozen.
__device__ __forceinline__ float fg_tanh_approx(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// float division as the op table spells it under FlexKernelOptions::approx_math: div.full.f32, full range, max
// error 2 ulp (PTX ISA) — what Triton's `/` compiles to, so PyTorch's own flex kernels divide this way. By a
// constant (softcap's score / 20) ptxas folds it into one multiply by the reciprocal, where __fdiv_rn still
// issues its refinement (five FFMA, an FCHK range test and a branch to the slow path, ~11 issue slots an entry in
// the forward's softcap step); by a variable, one MUFU.RCP with scaling.
__device__ __forceinline__ float fg_fdiv_full(float x, float y) {
  float r;
  asm("div.full.f32 %0, %1, %2;" : "=f"(r) : "f"(x), "f"(y));
  return r;
}

// x / c in Markstein's corrected form (attention/const_division.h, corrected_reciprocal): c > 0 a constant the form is
// proven for, r = RN(1 / c). RN(x / c) where fg_div_corrected_ok(x); the generated fg_score_elem_fast spells such
// divisions so, and the kernels call it only for a thread's entries whose dividends all pass (FG_SCORE_ELEM_FAST).
__device__ __forceinline__ float fg_div_corrected(float x, float c, float r) {
  const float q = __fmul_rn(x, r);
  return __fmaf_rn(-__fmaf_rn(q, c, -x), r, q);  // the residual negated twice: a zero keeps its sign
}
__device__ __forceinline__ bool fg_div_corrected_ok(float x) {
  const unsigned ax = __float_as_uint(x) & 0x7fffffffu;
  return ax - 0x1f800000u <= 0x5f800000u - 0x1f800000u || ax == 0u;  // |x| in [2^-64, 2^64] (NaN: no), or zero
}

// The capture-gradient sink a kernel hands to fg_cap_grad: one call per (term, element) with the
// linear (row-major, contiguous) index into captured tensor `cap` and the value to add there.
// Kernels define their own sink type with this member:
//   __device__ void add(int cap, fg_i64 linear_index, double value) const;
// fg_cap_grad is a template over the sink type, so the accumulation policy (deterministic fixed-point
// or float atomics) belongs to the kernel, not to the generated code.
