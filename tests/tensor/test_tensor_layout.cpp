// The strided layout, element access and factories of the tensor layer (no ops involved).
#include <gtest/gtest.h>

#include "tests/test_util.h"

#include <string>

#include "flexgrad/tensor/tensor.h"

namespace fg {
namespace {

using ::fg::testing::expect_error;

TEST(Layout, ContiguousStrides) {
  EXPECT_EQ(contiguous_strides({2, 3, 4}), (Shape{12, 4, 1}));
  EXPECT_EQ(contiguous_strides({}), Shape{});
  EXPECT_EQ(contiguous_strides({3, 0, 2}), (Shape{2, 2, 1}));  // zero sizes do not zero the strides
  Tensor t = zeros({2, 3});
  EXPECT_EQ(t.strides(), (Shape{3, 1}));
  EXPECT_EQ(t.numel(), 6);
  EXPECT_EQ(t.size(-1), 3);
  EXPECT_TRUE(t.is_contiguous());
  EXPECT_EQ(shape_numel({}), 1);
}

TEST(Layout, AliasSharesStorageAndVersion) {
  Tensor t = arange(6.0, kFloat32);
  Tensor m = t.alias_with_layout({2, 3}, {3, 1}, 0);
  Tensor tr = t.alias_with_layout({3, 2}, {1, 3}, 0);  // the transpose of m
  EXPECT_TRUE(m.shares_storage(t));
  EXPECT_FALSE(m.is_same(t));
  EXPECT_TRUE(m.is_contiguous());
  EXPECT_FALSE(tr.is_contiguous());
  EXPECT_EQ(tr.at({2, 1}), 5.0);
  EXPECT_EQ(tr.at({1, 0}), 1.0);
  uint32_t v0 = t.version();
  tr.set_at({0, 1}, 42.0);  // element 3 of the storage
  EXPECT_EQ(t.at({3}), 42.0);
  EXPECT_EQ(m.at({1, 0}), 42.0);
  EXPECT_EQ(t.version(), v0 + 1);
  EXPECT_EQ(m.version(), t.version());
  Tensor row = t.alias_with_layout({3}, {1}, 3);  // offset view
  EXPECT_EQ(row.to_vector(), (std::vector<double>{42, 4, 5}));
  EXPECT_EQ(tr.to_vector(), (std::vector<double>{0, 42, 1, 4, 2, 5}));
}

TEST(Layout, SizeOneDimsIgnoredForContiguity) {
  Tensor t = zeros({4});
  EXPECT_TRUE(t.alias_with_layout({1, 4}, {100, 1}, 0).is_contiguous());
  EXPECT_FALSE(t.alias_with_layout({2, 2}, {1, 2}, 0).is_contiguous());
}

TEST(ElementAccess, NegativeIndicesAndWrites) {
  Tensor t = from_vector<double>({1, 2, 3, 4, 5, 6}, {2, 3});
  EXPECT_EQ(t.at({-1, -1}), 6.0);
  EXPECT_EQ(t.at({-2, 1}), 2.0);
  t.set_at({-1, 0}, -7.5);
  EXPECT_EQ(t.at({1, 0}), -7.5);
  Tensor i = zeros({3}, kInt32);
  i.set_at({1}, 7.9);  // converts like a C++ cast (truncation)
  EXPECT_EQ(i.at({1}), 7.0);
  Tensor b = zeros({2}, kBool);
  b.set_at({0}, 2.0);
  EXPECT_EQ(b.at({0}), 1.0);
  Tensor h = zeros({1}, kFloat16);
  h.set_at({0}, 1.0 / 3.0);
  EXPECT_EQ(h.at({0}), 0.333251953125);  // rounded to the nearest half
}

TEST(ElementAccess, Errors) {
  Tensor t = zeros({2, 3});
  expect_error<IndexError>([&] { t.at({0, 3}); }, "index 3 is out of bounds for dimension 1 with size 3");
  expect_error<IndexError>([&] { t.at({-3, 0}); }, "index -3 is out of bounds for dimension 0 with size 2");
  expect_error<IndexError>([&] { t.set_at({0}, 1.0); }, "index [0] has 1 entries but the tensor has 2 dimensions");
  expect_error<IndexError>([&] { t.size(2); }, "dimension out of range (expected to be in range of [-2, 1], but got 2)");
  expect_error<DTypeError>([&] { t.data<double>(); }, "tensor has dtype float32 but T is float64");
}

TEST(ElementAccess, Item) {
  EXPECT_EQ(full({}, 2.5).item<double>(), 2.5);
  EXPECT_EQ(full({1, 1}, 3, kInt64).item<int64_t>(), 3);
  EXPECT_TRUE(ones({1}, kBool).item<bool>());
  expect_error<ValueError>([] { zeros({2, 3}).item(); },
                           "a Tensor with 6 elements cannot be converted to a scalar (shape [2, 3])");
  expect_error<ValueError>([] { Tensor().item(); }, "a Tensor with 0 elements");
}

TEST(Factories, Fills) {
  EXPECT_EQ(zeros({2, 2}).to_vector(), (std::vector<double>(4, 0.0)));
  EXPECT_EQ(ones({3}, kInt32).to_vector(), (std::vector<double>(3, 1.0)));
  Tensor f = full({2}, 1.5, kFloat64);
  EXPECT_EQ(f.dtype(), kFloat64);
  EXPECT_EQ(f.to_vector(), (std::vector<double>{1.5, 1.5}));
  EXPECT_EQ(zeros({}).dim(), 0);
  EXPECT_EQ(zeros({}).numel(), 1);
  EXPECT_EQ(zeros({0, 3}).numel(), 0);
  EXPECT_TRUE(zeros({2}, TensorOptions().requires_grad()).requires_grad());
  expect_error<ShapeError>([] { zeros({2, -1}); }, "negative size -1 in shape [2, -1]");
}

TEST(Factories, Arange) {
  EXPECT_EQ(arange(4.0).dtype(), kInt64);
  EXPECT_EQ(arange(4.0).to_vector(), (std::vector<double>{0, 1, 2, 3}));
  EXPECT_EQ(arange(0, 1, 0.25, kFloat64).to_vector(), (std::vector<double>{0, 0.25, 0.5, 0.75}));
  EXPECT_EQ(arange(1, 2.6, 0.5, kFloat64).to_vector(), (std::vector<double>{1, 1.5, 2, 2.5}));  // ceil((end-start)/step)
  EXPECT_EQ(arange(5, 1, -2, kFloat32).to_vector(), (std::vector<double>{5, 3}));
  EXPECT_EQ(arange(3, 3, 1).numel(), 0);
  expect_error<ValueError>([] { arange(0, 1, 0); }, "step must be nonzero");
  expect_error<ValueError>([] { arange(0, 5, -1); }, "inconsistent with step sign");
}

TEST(Factories, LinspaceLastElementExact) {
  Tensor l = linspace(-1.0, 0.3, 11, kFloat64);
  EXPECT_EQ(l.numel(), 11);
  EXPECT_EQ(l.at({0}), -1.0);
  EXPECT_EQ(l.at({10}), 0.3);
  EXPECT_NEAR(l.at({5}), -0.35, 1e-15);
  Tensor f = linspace(0, 1, 7);
  EXPECT_EQ(f.at({6}), 1.0);
  EXPECT_EQ(linspace(2, 5, 1).to_vector(), (std::vector<double>{2}));
  EXPECT_EQ(linspace(2, 5, 0).numel(), 0);
  expect_error<ValueError>([] { linspace(0, 1, -1); }, "number of steps must be non-negative, got -1");
}

TEST(Factories, EyeAndFromVector) {
  EXPECT_EQ(eye(2, 3).to_vector(), (std::vector<double>{1, 0, 0, 0, 1, 0}));
  EXPECT_EQ(eye(2).sizes(), (Shape{2, 2}));
  Tensor v = from_vector<int32_t>({1, 2, 3, 4}, {2, 2}, kInt32);
  EXPECT_EQ(v.dtype(), kInt32);
  EXPECT_EQ(v.at({1, 0}), 3.0);
  expect_error<ShapeError>([] { from_vector<float>({1, 2, 3}, {2, 2}); },
                           "from_vector: 3 values cannot fill shape [2, 2] (4 elements)");
}

TEST(Broadcast, Shapes) {
  EXPECT_EQ(broadcast_shapes({2, 1, 3}, {4, 1}, "add"), (Shape{2, 4, 3}));
  EXPECT_EQ(broadcast_shapes({}, {5}, "add"), (Shape{5}));
  EXPECT_EQ(broadcast_shapes({0, 1}, {1, 7}, "add"), (Shape{0, 7}));
  expect_error<ShapeError>([] { broadcast_shapes({2, 3}, {4}, "mul"); },
                           "mul: shapes [2, 3] and [4] cannot be broadcast (size 3 vs 4 at dimension 1)");
}

}  // namespace
}  // namespace fg

namespace fg {
namespace {
// Sizes whose element or byte count passes INT64_MAX are errors, never a wrapped (small or zero) size.
TEST(TensorLayoutLimits, SizesThatOverflowAreErrorsNotWraps) {
  EXPECT_THROW_MSG(zeros({int64_t{1} << 61, 8}), ShapeError, "more elements than an int64 can count");
  EXPECT_THROW_MSG(full({1, INT64_MAX / 2}, 1.0, kFloat32), ShapeError, "need more bytes than an int64 can count");
  EXPECT_THROW_MSG(empty_strided({2, 2}, {INT64_MAX, 1}), ShapeError, "reach past the int64 range");
  EXPECT_THROW_MSG(empty_strided({2}, {-1}), ShapeError, "negative stride");
  EXPECT_THROW_MSG(shape_numel({3, -1}), ShapeError, "negative size -1");
  EXPECT_EQ(zeros({int64_t{1} << 62, 0}).numel(), 0);  // nothing to hold: fine
}
}  // namespace
}  // namespace fg

namespace fg {
namespace {

// An undefined Tensor (default-constructed; what grad() is before a backward) is refused with a ValueError
// by every layout accessor instead of a read through a null pointer.
TEST(TensorLayout, UndefinedTensorAccessorsRaise) {
  const Tensor u;
  ASSERT_FALSE(u.defined());
  EXPECT_THROW_MSG(u.sizes(), ValueError, "undefined");
  EXPECT_THROW_MSG(u.dtype(), ValueError, "undefined");
  EXPECT_THROW_MSG(u.device(), ValueError, "undefined");
  EXPECT_THROW_MSG(u.numel(), ValueError, "undefined");
  EXPECT_THROW_MSG(u.to_vector(), ValueError, "undefined");
}

}  // namespace
}  // namespace fg
