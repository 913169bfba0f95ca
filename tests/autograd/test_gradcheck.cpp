// gradcheck on custom Functions written with raw element access (no ops needed): a correct backward
// passes, a wrong one fails and the report names the worst Jacobian entry.
#include <gtest/gtest.h>

#include "flexgrad/autograd/function.h"
#include "flexgrad/autograd/gradcheck.h"

namespace fg {
namespace {

// out[i] = f(in[i]) elementwise over contiguous float64 tensors.
template <class F>
Tensor map(const Tensor& x, F f) {
  FG_ASSERT(x.is_contiguous() && x.dtype() == kFloat64);
  Tensor y = empty(x.sizes(), x.options());
  const double* px = x.data<double>();
  double* py = y.data<double>();
  for (int64_t i = 0; i < x.numel(); ++i) py[i] = f(px[i], i);
  return y;
}

// y = x^3 with a backward of scale * x^2 (scale 3 is right).
template <int Scale>
struct Cube : Function<Cube<Scale>> {
  static TensorList forward(FunctionCtx& ctx, const TensorList& in) {
    ctx.save_for_backward({in[0]});
    return {map(in[0], [](double v, int64_t) { return v * v * v; })};
  }
  static TensorList backward(FunctionCtx& ctx, const TensorList& g) {
    Tensor x = ctx.saved_tensors()[0];
    const double* pg = g[0].data<double>();
    return {map(x, [pg](double v, int64_t i) { return pg[i] * Scale * v * v; })};
  }
};

// (x * y, x + 2) with two inputs and two outputs; `unused` is an input the outputs do not depend on.
struct MulAndShift : Function<MulAndShift> {
  static TensorList forward(FunctionCtx& ctx, const TensorList& in) {
    ctx.save_for_backward({in[0], in[1]});
    const double* py = in[1].data<double>();
    return {map(in[0], [py](double v, int64_t i) { return v * py[i]; }), map(in[0], [](double v, int64_t) { return v + 2; })};
  }
  static TensorList backward(FunctionCtx& ctx, const TensorList& g) {
    auto saved = ctx.saved_tensors();
    const double* px = saved[0].data<double>();
    const double* py = saved[1].data<double>();
    const double* g0 = g[0].defined() ? g[0].data<double>() : nullptr;
    const double* g1 = g[1].defined() ? g[1].data<double>() : nullptr;
    Tensor dx = map(saved[0], [&](double, int64_t i) { return (g0 ? g0[i] * py[i] : 0) + (g1 ? g1[i] : 0); });
    Tensor dy = map(saved[1], [&](double, int64_t i) { return g0 ? g0[i] * px[i] : 0; });
    return {dx, dy, Tensor()};
  }
};

Tensor leaf(std::vector<double> v, const Shape& shape) {
  return from_vector<double>(v, shape, TensorOptions(kFloat64).requires_grad());
}

TEST(Gradcheck, CorrectBackwardPasses) {
  Tensor x = leaf({0.5, -1.5, 2.0, 1.0, -0.25, 0.75}, {2, 3});
  GradcheckResult r = gradcheck([](const TensorList& in) { return Cube<3>::apply(in); }, {x});
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 36);  // full 6 x 6 Jacobian, including the zero off-diagonal entries
  EXPECT_NE(r.report().find("gradcheck passed"), std::string::npos);
  // The inputs are restored after perturbation.
  EXPECT_EQ(x.to_vector(), (std::vector<double>{0.5, -1.5, 2.0, 1.0, -0.25, 0.75}));
}

TEST(Gradcheck, WrongBackwardFailsAndNamesWorstElement) {
  Tensor x = leaf({0.5, -1.5, 2.0, 1.0}, {4});
  GradcheckResult r = gradcheck([](const TensorList& in) { return Cube<2>::apply(in); }, {x});
  EXPECT_FALSE(r.ok);
  // |3x^2 - 2x^2| - rtol * 3x^2 is largest at x = 2.0, index 2: numeric 12, analytic 8.
  EXPECT_EQ(r.input, 0);
  EXPECT_EQ(r.output, 0);
  EXPECT_EQ(r.index, Shape{2});
  EXPECT_EQ(r.output_index, Shape{2});
  EXPECT_NEAR(r.numeric, 12.0, 1e-6);
  EXPECT_DOUBLE_EQ(r.analytic, 8.0);
  std::string rep = r.report();
  EXPECT_NE(rep.find("gradcheck failed"), std::string::npos) << rep;
  EXPECT_NE(rep.find("output 0 at index [2] with respect to input 0 at index [2]"), std::string::npos) << rep;
  EXPECT_NE(rep.find("analytical 8"), std::string::npos) << rep;
}

TEST(Gradcheck, RaiseOnFailureThrowsTheReport) {
  Tensor x = leaf({1.0, 3.0}, {2});
  GradcheckOptions o;
  o.raise_on_failure = true;
  try {
    gradcheck([](const TensorList& in) { return Cube<2>::apply(in); }, {x}, o);
    FAIL() << "expected AutogradError";
  } catch (const AutogradError& e) {
    EXPECT_NE(std::string(e.what()).find("input 0 at index [1]"), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(gradcheck([](const TensorList& in) { return Cube<3>::apply(in); }, {x}, o));
}

TEST(Gradcheck, SeveralInputsOutputsAndUnusedInput) {
  Tensor x = leaf({1.0, -2.0, 0.5}, {3});
  Tensor y = leaf({3.0, 0.25, -1.0}, {3});
  Tensor unused = leaf({7.0}, {1});
  GradcheckResult r = gradcheck([](const TensorList& in) { return MulAndShift::apply(in); }, {x, y, unused});
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 2 * (3 * 3 + 3 * 3 + 3 * 1));  // two outputs of 3 against inputs of 3, 3 and 1
}

TEST(Gradcheck, InputsWithoutGradAreConstants) {
  Tensor x = leaf({1.0, -2.0}, {2});
  Tensor y = from_vector<double>({4.0, 5.0}, {2}, kFloat64);  // no grad: not perturbed
  GradcheckResult r = gradcheck([](const TensorList& in) { return MulAndShift::apply({in[0], in[1], Tensor()}); }, {x, y});
  EXPECT_TRUE(r.ok) << r.report();
  EXPECT_EQ(r.checked, 2 * 2 * 2);
}

TEST(Gradcheck, RejectsNonFloat64AndNoGradInputs) {
  Tensor x64 = leaf({1.0}, {1});
  Tensor x32 = from_vector<float>({1.0f}, {1}, TensorOptions().requires_grad());
  auto fn = [](const TensorList& in) { return TensorList{in[0]}; };
  try {
    gradcheck(fn, {x64, x32});
    FAIL() << "expected DTypeError";
  } catch (const DTypeError& e) {
    EXPECT_NE(std::string(e.what()).find("input 1 requires grad but has dtype float32"), std::string::npos) << e.what();
  }
  EXPECT_THROW(gradcheck(fn, {from_vector<double>({1.0}, {1}, kFloat64)}), ValueError);
}

}  // namespace
}  // namespace fg
