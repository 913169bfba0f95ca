// Typed exceptions and the FG_CHECK macro. Every user-facing failure in flexgrad throws one of these
// with a message that names the op, the argument, what was seen and what was expected.
#pragma once
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <stdexcept>
#include <string>

namespace fg {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct ShapeError : Error { using Error::Error; };          // incompatible sizes, bad views, broadcasting
struct DTypeError : Error { using Error::Error; };          // unsupported or mismatched dtypes
struct DeviceError : Error { using Error::Error; };         // tensors on different / unavailable devices
struct IndexError : Error { using Error::Error; };          // dims or indices out of range
struct ValueError : Error { using Error::Error; };          // any other bad argument value
struct AutogradError : Error { using Error::Error; };       // misuse of the autograd tape
struct NotImplementedError : Error { using Error::Error; }; // a valid request flexgrad does not support
struct CudaError : Error { using Error::Error; };           // a failed CUDA runtime / library call
struct IOError : Error { using Error::Error; };             // files: missing, malformed, unsupported

}  // namespace fg

// FG_CHECK(cond, ErrorType, "fmt {}", args...): throw ErrorType with a formatted message when cond is false.
#define FG_CHECK(cond, ErrorType, ...)                      \
  do {                                                      \
    if (!(cond)) [[unlikely]] {                             \
      throw ::fg::ErrorType(::fmt::format(__VA_ARGS__));    \
    }                                                       \
  } while (0)

// FG_FAIL(ErrorType, "fmt {}", args...): throw unconditionally.
#define FG_FAIL(ErrorType, ...) throw ::fg::ErrorType(::fmt::format(__VA_ARGS__))

// Internal invariant; a failure here is a flexgrad bug, not a user error.
#define FG_ASSERT(cond)                                                                               \
  do {                                                                                                \
    if (!(cond)) [[unlikely]] {                                                                       \
      throw ::fg::Error(::fmt::format("internal error: {} failed at {}:{}", #cond, __FILE__, __LINE__)); \
    }                                                                                                 \
  } while (0)
