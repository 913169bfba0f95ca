// Helpers shared by the test suites.
#pragma once
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "flexgrad/ops/ops.h"
#include "tests/scratch.h"

namespace fg::testing {

// Expects `stmt` to throw exception type E whose message contains every given substring.
#define EXPECT_THROW_MSG(stmt, E, ...)                                                       \
  do {                                                                                       \
    try {                                                                                    \
      stmt;                                                                                  \
      ADD_FAILURE() << "expected " #E " from: " #stmt;                                       \
    } catch (const E& e) {                                                                   \
      for (const std::string& part : {__VA_ARGS__}) {                                        \
        EXPECT_THAT(std::string(e.what()), ::testing::HasSubstr(part)) << "from: " #stmt;   \
      }                                                                                      \
    }                                                                                        \
  } while (0)

// Runs f, expecting exception E whose message contains `needle` (for statements with commas in them).
template <class E, class F>
inline void expect_error(F&& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected an exception containing: " << needle;
  } catch (const E& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message was: " << e.what();
  }
}

// PyTorch's conformance data: the environment variable FLEXGRAD_CONFORMANCE_DIR when set, else the path CMake
// gives every test binary (../shared/conformance beside the source tree).
inline std::string conformance_dir() {
  if (const char* env = std::getenv("FLEXGRAD_CONFORMANCE_DIR")) return env;
  return FLEXGRAD_CONFORMANCE_DIR;
}

#ifdef FLEXGRAD_GALLERY_DIR
// PyTorch's mask/score-mod gallery results: FLEXGRAD_GALLERY_DIR from the environment when set, else the path
// CMake gives the suites that link the conformance harness (../shared/gallery beside the source tree, or the
// FLEXGRAD_GALLERY_DIR cache variable).
inline std::string gallery_dir() {
  if (const char* env = std::getenv("FLEXGRAD_GALLERY_DIR")) return env;
  return FLEXGRAD_GALLERY_DIR;
}
#endif

inline Tensor tensor(std::vector<double> values, Shape shape, DType dtype = kFloat64) {
  return from_vector(values, shape, dtype);
}

// Element-wise comparison in double with a tolerance, reporting the first mismatch.
inline ::testing::AssertionResult close(const Tensor& a, const Tensor& b, double atol = 1e-6, double rtol = 1e-6) {
  if (a.sizes() != b.sizes()) {
    return ::testing::AssertionFailure() << "shapes differ: " << shape_str(a.sizes()) << " vs " << shape_str(b.sizes());
  }
  auto va = a.to_vector(), vb = b.to_vector();
  for (size_t i = 0; i < va.size(); ++i) {
    bool both_nan = std::isnan(va[i]) && std::isnan(vb[i]);
    bool same_inf = std::isinf(va[i]) && va[i] == vb[i];
    if (!both_nan && !same_inf && !(std::abs(va[i] - vb[i]) <= atol + rtol * std::abs(vb[i]))) {
      return ::testing::AssertionFailure() << "element " << i << ": " << va[i] << " vs " << vb[i];
    }
  }
  return ::testing::AssertionSuccess();
}

// Sets (or, with nullptr, removes) an environment variable for a scope, restoring what was there.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    set(value);
  }
  ~ScopedEnv() { set(had_ ? old_.c_str() : nullptr); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  void set(const char* value) const {
    if (value != nullptr) ::setenv(name_.c_str(), value, 1);
    else ::unsetenv(name_.c_str());
  }

 private:
  std::string name_, old_;
  bool had_ = false;
};

}  // namespace fg::testing
