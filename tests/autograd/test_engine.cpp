// The autograd engine: graph shapes, accumulation, retain_graph, grad modes, hooks, custom functions,
// version counters and very deep graphs.
#include "tests/test_util.h"

namespace fg {
namespace {
using testing::close;
using testing::tensor;

TEST(Engine, DiamondGraphSumsBothPaths) {
  Tensor x = tensor({2.0}, {1}).requires_grad_();
  Tensor a = x * 3.0, b = x * x;  // two paths from x
  Tensor y = a * b;               // y = 3x^3, dy/dx = 9x^2 = 36
  y.sum().backward();
  EXPECT_DOUBLE_EQ(x.grad().item(), 36.0);
}

TEST(Engine, LeafGradientsAccumulateAcrossBackwardCalls) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  (x * 2.0).sum().backward();
  (x * 3.0).sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({5, 5}, {2})));
}

TEST(Engine, ExplicitGradientForNonScalarOutput) {
  Tensor x = tensor({1, 2, 3}, {3}).requires_grad_();
  Tensor y = x * x;
  EXPECT_THROW_MSG(y.backward(), AutogradError, "scalar outputs");
  y.backward(tensor({1, 10, 100}, {3}));
  EXPECT_TRUE(close(x.grad(), tensor({2, 40, 600}, {3})));
  EXPECT_THROW_MSG(tensor({1}, {1}).backward(), AutogradError, "does not require grad");
}

TEST(Engine, SecondBackwardNeedsRetainGraph) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = (x * x).sum();
  y.backward(Tensor(), /*retain_graph=*/true);
  y.backward();
  EXPECT_TRUE(close(x.grad(), tensor({4, 8}, {2})));
  EXPECT_THROW_MSG(y.backward(), AutogradError, "backward through the graph a second time", "retain_graph");
}

TEST(Engine, NoGradAndEnableGradGuards) {
  Tensor x = tensor({1}, {1}).requires_grad_();
  {
    NoGradGuard g;
    Tensor y = x * 2.0;
    EXPECT_FALSE(y.requires_grad());
    EXPECT_EQ(y.grad_fn(), nullptr);
    {
      EnableGradGuard e;
      EXPECT_TRUE((x * 2.0).requires_grad());
    }
    EXPECT_FALSE(GradMode::is_enabled());
  }
  EXPECT_TRUE(GradMode::is_enabled());
  EXPECT_TRUE((x * 2.0).requires_grad());
}

TEST(Engine, DetachCutsHistoryButSharesStorage) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = x * 2.0;
  Tensor d = y.detach();
  EXPECT_FALSE(d.requires_grad());
  EXPECT_TRUE(d.shares_storage(y));
  Tensor z = (d * x).sum();
  z.backward();
  EXPECT_TRUE(close(x.grad(), tensor({2, 4}, {2})));  // no gradient through d
  EXPECT_THROW_MSG(y.requires_grad_(false), AutogradError, "leaf");
}

TEST(Engine, HooksOnLeavesAndIntermediatesAndRetainGrad) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = x * 3.0;
  std::vector<double> seen;
  y.register_hook([&](const Tensor& g) { seen.push_back(g.at({0})); return g * 2.0; });  // doubles y's grad
  x.register_hook([&](const Tensor& g) { seen.push_back(g.at({0})); return Tensor(); });
  y.retain_grad();
  (y * y).sum().backward();
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_DOUBLE_EQ(seen[0], 6.0);    // d(y^2)/dy at y=3
  EXPECT_DOUBLE_EQ(seen[1], 36.0);   // (2*6) * 3
  EXPECT_TRUE(close(y.grad(), tensor({12, 24}, {2})));  // retained after the hook
  EXPECT_TRUE(close(x.grad(), tensor({36, 72}, {2})));
  EXPECT_THROW_MSG(tensor({1}, {1}).register_hook([](const Tensor& g) { return g; }), AutogradError, "doesn't require");
}

TEST(Engine, GradFunctionReturnsWithoutAccumulating) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_(), w = tensor({3}, {1}).requires_grad_();
  Tensor y = (x * w).sum();
  TensorList g = grad({y}, {x, w}, {}, /*retain_graph=*/true);
  EXPECT_TRUE(close(g[0], tensor({3, 3}, {2})));
  EXPECT_TRUE(close(g[1], tensor({3}, {1})));
  EXPECT_FALSE(x.grad().defined());
  Tensor unused = tensor({1}, {1}).requires_grad_();
  EXPECT_THROW_MSG(grad({y}, {unused}, {}, /*retain_graph=*/true), AutogradError, "not used");
  EXPECT_FALSE(grad({y}, {unused}, {}, true, /*allow_unused=*/true)[0].defined());
}

struct CubeFn : Function<CubeFn> {
  static TensorList forward(FunctionCtx& ctx, const TensorList& in) {
    ctx.save_for_backward({in[0]});
    ctx.saved_data["k"] = 3.0;
    return {in[0] * in[0] * in[0]};
  }
  static TensorList backward(FunctionCtx& ctx, const TensorList& g) {
    Tensor x = ctx.saved_tensors()[0];
    return {g[0] * std::any_cast<double>(ctx.saved_data["k"]) * x * x};
  }
};

TEST(Engine, CustomFunctionForwardAndBackward) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = CubeFn::apply({x})[0];
  EXPECT_TRUE(close(y, tensor({1, 8}, {2})));
  EXPECT_EQ(y.grad_fn_name(), "CubeFnBackward");
  y.sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({3, 12}, {2})));
  auto r = gradcheck([](const TensorList& in) { return CubeFn::apply(in); }, {tensor({0.5, -1.5}, {2}).requires_grad_()});
  EXPECT_TRUE(r.ok) << r.report();
}

// A backward whose gradient nobody else holds hands it over (kept_by_backward: a handle the test keeps, or none).
struct HandOverFn : Function<HandOverFn> {
  static inline Tensor kept_by_backward;
  static inline bool keep = false;
  static inline void* made = nullptr;  // the data of the gradient backward made
  static TensorList forward(FunctionCtx&, const TensorList& in) { return {in[0] * 1.0}; }
  static TensorList backward(FunctionCtx&, const TensorList& g) {
    Tensor fresh = g[0] * 2.0;
    made = fresh.data_ptr();
    if (keep) kept_by_backward = fresh;
    return {fresh};
  }
};

// AccumulateGrad takes a gradient as .grad without a copy only where nobody else can see it (as libtorch's): a
// fresh, unshared, contiguous gradient becomes .grad itself; one another handle holds, a view of the caller's
// gradient, or one reaching two leaves is copied, so an in-place change of .grad reaches nothing else.
TEST(Engine, FirstGradientIsTakenWithoutACopyOnlyWhereNobodyElseSeesIt) {
  {  // fresh and unshared: taken as it is
    Tensor x = tensor({1, 2}, {2}).requires_grad_();
    HandOverFn::keep = false;
    HandOverFn::apply({x})[0].sum().backward();
    EXPECT_EQ(x.grad().data_ptr(), HandOverFn::made);
    EXPECT_TRUE(close(x.grad(), tensor({2, 2}, {2})));
  }
  {  // another handle holds it: copied
    Tensor x = tensor({1, 2}, {2}).requires_grad_();
    HandOverFn::keep = true;
    HandOverFn::apply({x})[0].sum().backward();
    HandOverFn::keep = false;
    EXPECT_NE(x.grad().data_ptr(), HandOverFn::made);
    x.mutable_grad().mul_(10.0);
    EXPECT_TRUE(close(HandOverFn::kept_by_backward, tensor({2, 2}, {2})));
    EXPECT_TRUE(close(x.grad(), tensor({20, 20}, {2})));
    HandOverFn::kept_by_backward = Tensor();
  }
  {  // the caller's gradient reaches the leaf through a view: copied, the caller's tensor untouched
    Tensor x = tensor({1, 2, 3, 4}, {4}).requires_grad_();
    Tensor g = tensor({1, 10, 100, 1000}, {2, 2});
    x.view({2, 2}).backward(g);
    EXPECT_NE(x.grad().data_ptr(), g.data_ptr());
    x.mutable_grad().zero_();
    EXPECT_TRUE(close(g, tensor({1, 10, 100, 1000}, {2, 2})));
  }
  {  // one gradient tensor for two leaves (add's backward passes it to both): each leaf gets its own
    Tensor a = tensor({1, 2}, {2}).requires_grad_(), b = tensor({3, 4}, {2}).requires_grad_();
    (a + b).backward(tensor({5, 6}, {2}));
    EXPECT_NE(a.grad().data_ptr(), b.grad().data_ptr());
    a.mutable_grad().zero_();
    EXPECT_TRUE(close(b.grad(), tensor({5, 6}, {2})));
  }
}

TEST(Engine, InPlaceChangeOfASavedTensorIsAnError) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = x.clone();
  Tensor z = exp(y);  // saves its output
  z.add_(1.0);
  EXPECT_THROW_MSG(z.sum().backward(), AutogradError, "inplace", "version");
}

TEST(Engine, InPlaceOnNonLeafRebasesHistory) {
  Tensor x = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = x * 2.0;
  y.add_(x);   // y = 3x
  y.mul_(y);   // y = 9x^2
  y.sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({18, 36}, {2})));
}

TEST(Engine, HundredThousandNodeChainRunsAndFreesWithoutRecursion) {
  Tensor x = tensor({1.0}, {1}).requires_grad_();
  Tensor y = x;
  for (int i = 0; i < 100000; ++i) y = y + 1e-6;
  y.sum().backward();
  EXPECT_DOUBLE_EQ(x.grad().item(), 1.0);
  y = Tensor();  // drops the whole chain: must not overflow the stack
  SUCCEED();
}

}  // namespace
}  // namespace fg
