// Shared by the CUDA kernels: the device type of each stored dtype, float<->storage conversions that
// round like the CPU's Half/BFloat16 (to nearest, ties to even), dispatch and launch helpers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "flexgrad/tensor/cuda/cuda_check.h"
#include "flexgrad/tensor/dtype.h"

namespace fg::cuda {

// Stored C++ type (fg::Half, ...) -> the type kernels use (same size and bits).
template <class T> struct dev_type { using type = T; };
template <> struct dev_type<Half> { using type = __half; };
template <> struct dev_type<BFloat16> { using type = __nv_bfloat16; };
template <class T> using dev_t = typename dev_type<T>::type;

// Arithmetic type of a device type: half types compute in float.
template <class D> struct dcompute { using type = D; };
template <> struct dcompute<__half> { using type = float; };
template <> struct dcompute<__nv_bfloat16> { using type = float; };
template <class D> using dc_t = typename dcompute<D>::type;

// Device type -> the stored host type (fg::Half, ...).
template <class D> struct host_type { using type = D; };
template <> struct host_type<__half> { using type = Half; };
template <> struct host_type<__nv_bfloat16> { using type = BFloat16; };
template <class D> using host_t = typename host_type<D>::type;

template <class D> __device__ __forceinline__ dc_t<D> load_c(D v) {
  if constexpr (std::is_same_v<D, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<D, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}
// Stores a compute value into D, rounding once (as static_cast<T>(static_cast<compute_t<T>>(v)) on the CPU).
template <class D, class V> __device__ __forceinline__ D store_c(V v) {
  if constexpr (std::is_same_v<D, __half>) return __float2half_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<D, __nv_bfloat16>) return __float2bfloat16_rn(static_cast<float>(v));
  else if constexpr (std::is_same_v<D, bool>) return v != V(0);
  else return static_cast<D>(v);
}

inline constexpr int kThreads = 256;

// V elements moved by one aligned vector access (16 bytes for V * sizeof(T) == 16).
template <class T, int V> struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

inline unsigned grid_for(int64_t work_items, int threads, int device, int waves = 4) {
  int64_t blocks = (work_items + threads - 1) / threads;
  int64_t cap = static_cast<int64_t>(num_sms(device)) * waves * (2048 / threads);
  if (blocks > cap) blocks = cap;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace fg::cuda

namespace fg::cuda {
// dispatch_all(dtype, "name", [&]<class D>() {...}): calls the lambda with the device type of dtype.
template <class F> decltype(auto) dispatch_all(DType t, const char* name, F&& f) {
  switch (t) {
    case DType::Bool: return f.template operator()<bool>();
    case DType::Int32: return f.template operator()<int32_t>();
    case DType::Int64: return f.template operator()<int64_t>();
    case DType::Float16: return f.template operator()<__half>();
    case DType::BFloat16: return f.template operator()<__nv_bfloat16>();
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
  }
  throw DTypeError(std::string(name) + ": unsupported dtype " + dtype_name(t));
}
template <class F> decltype(auto) dispatch_floating(DType t, const char* name, F&& f) {
  switch (t) {
    case DType::Float16: return f.template operator()<__half>();
    case DType::BFloat16: return f.template operator()<__nv_bfloat16>();
    case DType::Float32: return f.template operator()<float>();
    case DType::Float64: return f.template operator()<double>();
    default: break;
  }
  throw DTypeError(std::string(name) + ": unsupported dtype " + dtype_name(t) + " (expected a floating dtype)");
}
}  // namespace fg::cuda
