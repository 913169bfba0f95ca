// Printing: the exact strings PyTorch prints for the same tensors (torch/_tensor_str.py rules).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "flexgrad/autograd/record.h"
#include "flexgrad/tensor/print.h"

namespace fg {
namespace {

TEST(Print, FloatMatrixInIntMode) {
  EXPECT_EQ(from_vector<float>({1, 2, 3, 4}, {2, 2}).to_string(), "tensor([[1., 2.],\n        [3., 4.]])");
}

TEST(Print, FixedPointAlignsSigns) {
  EXPECT_EQ(from_vector<float>({1.5f, -2.25f, 3.0f}, {3}).to_string(), "tensor([ 1.5000, -2.2500,  3.0000])");
  EXPECT_EQ(from_vector<float>({0.1f, 0.2f}, {2}).to_string(), "tensor([0.1000, 0.2000])");
}

TEST(Print, ScientificWhenRangeIsWide) {
  EXPECT_EQ(from_vector<float>({1e-5f, 1.0f}, {2}).to_string(), "tensor([1.0000e-05, 1.0000e+00])");
  EXPECT_EQ(from_vector<double>({1.0, 12345.0}, {2}, kFloat64).to_string(),
            "tensor([1.0000e+00, 1.2345e+04], dtype=float64)");
  EXPECT_EQ(from_vector<float>({2e8f, 1.5f}, {2}).to_string(), "tensor([2.0000e+08, 1.5000e+00])");
}

TEST(Print, NonFiniteValues) {
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  EXPECT_EQ(from_vector<float>({1, nan, inf}, {3}).to_string(), "tensor([1., nan, inf])");
  EXPECT_EQ(from_vector<float>({-inf, 0.5f}, {2}).to_string(), "tensor([  -inf, 0.5000])");
  EXPECT_EQ(from_vector<float>({0, 0}, {2}).to_string(), "tensor([0., 0.])");
}

TEST(Print, IntegersAndBools) {
  EXPECT_EQ(from_vector<int64_t>({1, -20, 300}, {3}, kInt64).to_string(), "tensor([  1, -20, 300])");
  EXPECT_EQ(from_vector<int32_t>({1, 2}, {2}, kInt32).to_string(), "tensor([1, 2], dtype=int32)");
  EXPECT_EQ(from_vector<bool>({true, false}, {2}, kBool).to_string(), "tensor([ True, False])");
  // int64 prints exactly beyond 2^53.
  Tensor big = zeros({1}, kInt64);
  big.data<int64_t>()[0] = 9007199254740993;
  EXPECT_EQ(big.to_string(), "tensor([9007199254740993])");
}

TEST(Print, ScalarsAndEmpty) {
  EXPECT_EQ(full({}, 3.5).to_string(), "tensor(3.5000)");
  EXPECT_EQ(full({}, 2.0, kFloat64).to_string(), "tensor(2., dtype=float64)");
  EXPECT_EQ(full({}, 7, kInt64).to_string(), "tensor(7)");
  EXPECT_EQ(zeros({0}).to_string(), "tensor([])");
  EXPECT_EQ(zeros({2, 0}).to_string(), "tensor([], size=(2, 0))");
  EXPECT_EQ(zeros({0}, kInt64).to_string(), "tensor([], dtype=int64)");
  EXPECT_EQ(Tensor().to_string(), "Tensor(undefined)");
}

TEST(Print, HalfTypesPrintAsFloat) {
  EXPECT_EQ(from_vector<float>({0.5f, 1.0f / 3}, {2}, kFloat16).to_string(),
            "tensor([0.5000, 0.3333], dtype=float16)");
  EXPECT_EQ(from_vector<float>({1.0f, 2.0f}, {2}, kBFloat16).to_string(), "tensor([1., 2.], dtype=bfloat16)");
}

TEST(Print, NonContiguousPrintsLogicalOrder) {
  Tensor base = arange(6.0);
  EXPECT_EQ(base.alias_with_layout({3, 2}, {1, 3}, 0).to_string(), "tensor([[0, 3],\n        [1, 4],\n        [2, 5]])");
}

TEST(Print, ThreeDimsSeparatedByBlankLines) {
  Tensor t = arange(8.0).alias_with_layout({2, 2, 2}, {4, 2, 1}, 0);
  EXPECT_EQ(t.to_string(),
            "tensor([[[0, 1],\n"
            "         [2, 3]],\n"
            "\n"
            "        [[4, 5],\n"
            "         [6, 7]]])");
}

TEST(Print, SummarisesLargeVector) {
  EXPECT_EQ(arange(2000.0).to_string(), "tensor([   0,    1,    2,  ..., 1997, 1998, 1999])");
}

TEST(Print, SummarisesLargeMatrix) {
  Tensor t = arange(2000.0).alias_with_layout({40, 50}, {50, 1}, 0);
  EXPECT_EQ(t.to_string(),
            "tensor([[   0,    1,    2,  ...,   47,   48,   49],\n"
            "        [  50,   51,   52,  ...,   97,   98,   99],\n"
            "        [ 100,  101,  102,  ...,  147,  148,  149],\n"
            "        ...,\n"
            "        [1850, 1851, 1852,  ..., 1897, 1898, 1899],\n"
            "        [1900, 1901, 1902,  ..., 1947, 1948, 1949],\n"
            "        [1950, 1951, 1952,  ..., 1997, 1998, 1999]])");
}

TEST(Print, FormatterSeesOnlyShownElements) {
  // The hidden middle element 1e6 would force scientific notation if it were considered.
  Tensor t = full({1001}, 1.5);
  t.set_at({500}, 1e6);
  EXPECT_EQ(t.to_string(), "tensor([1.5000, 1.5000, 1.5000,  ..., 1.5000, 1.5000, 1.5000])");
}

TEST(Print, WrapsAtLineWidth) {
  EXPECT_EQ(arange(30.0, kFloat32).to_string(),
            "tensor([ 0.,  1.,  2.,  3.,  4.,  5.,  6.,  7.,  8.,  9., 10., 11., 12., 13.,\n"
            "        14., 15., 16., 17., 18., 19., 20., 21., 22., 23., 24., 25., 26., 27.,\n"
            "        28., 29.])");
}

TEST(Print, SuffixesWrapToANewLine) {
  Tensor t = arange(14.0, TensorOptions(kFloat64).requires_grad());
  EXPECT_EQ(t.to_string(),
            "tensor([ 0.,  1.,  2.,  3.,  4.,  5.,  6.,  7.,  8.,  9., 10., 11., 12., 13.],\n"
            "       dtype=float64, requires_grad=True)");
}

TEST(Print, GradFnAndRequiresGrad) {
  Tensor x = from_vector<float>({1, 2}, {2}, TensorOptions().requires_grad());
  EXPECT_EQ(x.to_string(), "tensor([1., 2.], requires_grad=True)");
  Tensor y = from_vector<float>({2, 4}, {2});
  record("MulBackward", {x}, {y}, [](const TensorList& g) { return g; });
  EXPECT_EQ(y.to_string(), "tensor([2., 4.], grad_fn=<MulBackward>)");
  std::ostringstream os;
  os << y;
  EXPECT_EQ(os.str(), y.to_string());
  EXPECT_EQ(fmt::format("{}", y), y.to_string());
}

TEST(Print, OptionsChangePrecisionAndThreshold) {
  PrintOptions saved = print_options();
  PrintOptions o = saved;
  o.precision = 2;
  o.threshold = 5;
  o.edgeitems = 1;
  set_print_options(o);
  std::string a = from_vector<float>({1.125f, 2.5f}, {2}).to_string();
  std::string b = arange(6.0).to_string();
  set_print_options(saved);
  EXPECT_EQ(a, "tensor([1.12, 2.50])");  // 1.125 rounds half to even, as Python does
  EXPECT_EQ(b, "tensor([0,  ..., 5])");
  EXPECT_THROW(set_print_options(PrintOptions{.precision = -1}), ValueError);
}

TEST(Print, CudaDeviceSuffix) {
  if (!is_device_available(DeviceType::CUDA)) GTEST_SKIP() << "no CUDA device";
  Tensor t = from_vector<float>({1, 2}, {2}, TensorOptions().device(kCUDA));
  EXPECT_EQ(t.to_string(), "tensor([1., 2.], device='cuda:0')");
}

}  // namespace
}  // namespace fg
