// Element types and PyTorch's type promotion.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <fmt/format.h>

#include "flexgrad/tensor/half.h"

namespace fg {

enum class DType : uint8_t { Bool, Int32, Int64, Float16, BFloat16, Float32, Float64 };

inline constexpr DType kBool = DType::Bool;
inline constexpr DType kInt32 = DType::Int32;
inline constexpr DType kInt64 = DType::Int64;
inline constexpr DType kFloat16 = DType::Float16;
inline constexpr DType kBFloat16 = DType::BFloat16;
inline constexpr DType kFloat32 = DType::Float32;
inline constexpr DType kFloat64 = DType::Float64;

size_t element_size(DType t);
const char* dtype_name(DType t);  // "float32", "bfloat16", ... as PyTorch spells them
bool is_floating(DType t);
bool is_integral(DType t, bool include_bool = false);
// PyTorch's promote_types: bool < int32 < int64 < float16/bfloat16 < float32 < float64, f16+bf16 -> f32.
DType promote_types(DType a, DType b);
// Float dtype used when an integer input meets a float scalar or a true division (PyTorch's default dtype).
inline constexpr DType kDefaultFloat = DType::Float32;

// The C++ type stored for a DType.
template <DType T> struct dtype_cpp;
template <> struct dtype_cpp<DType::Bool> { using type = bool; };
template <> struct dtype_cpp<DType::Int32> { using type = int32_t; };
template <> struct dtype_cpp<DType::Int64> { using type = int64_t; };
template <> struct dtype_cpp<DType::Float16> { using type = Half; };
template <> struct dtype_cpp<DType::BFloat16> { using type = BFloat16; };
template <> struct dtype_cpp<DType::Float32> { using type = float; };
template <> struct dtype_cpp<DType::Float64> { using type = double; };

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<bool>() { return DType::Bool; }
template <> constexpr DType dtype_of<int32_t>() { return DType::Int32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::Int64; }
template <> constexpr DType dtype_of<Half>() { return DType::Float16; }
template <> constexpr DType dtype_of<BFloat16>() { return DType::BFloat16; }
template <> constexpr DType dtype_of<float>() { return DType::Float32; }
template <> constexpr DType dtype_of<double>() { return DType::Float64; }

// Type used for arithmetic on a stored type: half types compute in float.
template <class T> struct compute_type { using type = T; };
template <> struct compute_type<Half> { using type = float; };
template <> struct compute_type<BFloat16> { using type = float; };
template <class T> using compute_t = typename compute_type<T>::type;

}  // namespace fg

template <> struct fmt::formatter<fg::DType> : fmt::formatter<std::string_view> {
  auto format(fg::DType t, fmt::format_context& ctx) const {
    return fmt::formatter<std::string_view>::format(fg::dtype_name(t), ctx);
  }
};

// FG_DISPATCH_*(dtype, "op name", [&]<class scalar_t>() { ... }) calls the lambda with the stored C++ type.
#define FG_DISPATCH_CASE_(DT, ...) \
  case ::fg::DType::DT: return __VA_ARGS__.template operator()<typename ::fg::dtype_cpp<::fg::DType::DT>::type>();
#define FG_DISPATCH_FAIL_(dtype, name, what) \
  default: throw ::fg::DTypeError(::fmt::format("{}: unsupported dtype {} (expected {})", name, dtype, what));

#define FG_DISPATCH_ALL_TYPES(dtype, name, ...)                                                          \
  [&] { switch (dtype) {                                                                                 \
      FG_DISPATCH_CASE_(Bool, __VA_ARGS__) FG_DISPATCH_CASE_(Int32, __VA_ARGS__)                         \
      FG_DISPATCH_CASE_(Int64, __VA_ARGS__) FG_DISPATCH_CASE_(Float16, __VA_ARGS__)                      \
      FG_DISPATCH_CASE_(BFloat16, __VA_ARGS__) FG_DISPATCH_CASE_(Float32, __VA_ARGS__)                   \
      FG_DISPATCH_CASE_(Float64, __VA_ARGS__) FG_DISPATCH_FAIL_(dtype, name, "any dtype") } }()

#define FG_DISPATCH_FLOATING_TYPES(dtype, name, ...)                                                     \
  [&] { switch (dtype) {                                                                                 \
      FG_DISPATCH_CASE_(Float16, __VA_ARGS__) FG_DISPATCH_CASE_(BFloat16, __VA_ARGS__)                   \
      FG_DISPATCH_CASE_(Float32, __VA_ARGS__) FG_DISPATCH_CASE_(Float64, __VA_ARGS__)                    \
      FG_DISPATCH_FAIL_(dtype, name, "a floating dtype") } }()

#define FG_DISPATCH_INTEGRAL_TYPES(dtype, name, ...)                                                     \
  [&] { switch (dtype) {                                                                                 \
      FG_DISPATCH_CASE_(Int32, __VA_ARGS__) FG_DISPATCH_CASE_(Int64, __VA_ARGS__)                        \
      FG_DISPATCH_FAIL_(dtype, name, "int32 or int64") } }()

// Numeric types without bool.
#define FG_DISPATCH_NUMERIC_TYPES(dtype, name, ...)                                                      \
  [&] { switch (dtype) {                                                                                 \
      FG_DISPATCH_CASE_(Int32, __VA_ARGS__) FG_DISPATCH_CASE_(Int64, __VA_ARGS__)                        \
      FG_DISPATCH_CASE_(Float16, __VA_ARGS__) FG_DISPATCH_CASE_(BFloat16, __VA_ARGS__)                   \
      FG_DISPATCH_CASE_(Float32, __VA_ARGS__) FG_DISPATCH_CASE_(Float64, __VA_ARGS__)                    \
      FG_DISPATCH_FAIL_(dtype, name, "a numeric dtype") } }()
