// Ops given an undefined Tensor raise ValueError (from their own checks or the layout accessors), never crash:
// these six segfaulted before the accessors checked.
#include "flexgrad/ops/ops.h"
#include "tests/test_util.h"

namespace fg {
namespace {

TEST(UndefinedInputs, OpsRaiseInsteadOfCrashing) {
  const Tensor u;
  EXPECT_THROW_MSG(u.to(kCPU), ValueError, "undefined");
  EXPECT_THROW_MSG(cast(u, kFloat64), ValueError, "undefined");
  EXPECT_THROW_MSG(contiguous(u), ValueError, "undefined");
  EXPECT_THROW_MSG(reshape(u, {1}), ValueError, "undefined");
  EXPECT_THROW_MSG(clone(u), ValueError, "undefined");
  EXPECT_THROW_MSG(transpose(u, 0, 1), ValueError, "undefined");
}

}  // namespace
}  // namespace fg
