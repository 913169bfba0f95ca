// Autograd through views: in-place writes through a view rebase the base's history (CopySlices), a view
// read after its base changed sees the new history, and PyTorch's errors for in-place writes it forbids.
// Expected gradients are worked out by hand in the comments; composite programs are held to finite
// differences.
#include "flexgrad/autograd/gradcheck.h"
#include "flexgrad/autograd/view.h"
#include "tests/test_util.h"

namespace fg {
namespace {
using testing::close;
using testing::tensor;

// ---- the probes of issue 10

TEST(Views, InPlaceMulThroughSelectReachesTheBase) {
  // b = a * 1; b[0] *= 10; sum(b) = 10 a0 + a1.
  Tensor a = ones({2}, kFloat64).requires_grad_();
  Tensor b = a * 1.0;
  b[0].mul_(10.0);
  EXPECT_EQ(b.grad_fn_name(), "CopySlices");
  EXPECT_TRUE(close(b, tensor({10, 1}, {2})));
  b.sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({10, 1}, {2})));  // was [1, 1]
}

TEST(Views, SourceOfAnAddThroughAViewGetsItsGradient) {
  // a = [1, 1, 1], x = [2, 3]: b = 2a, b[1:3] += 3x -> b = [2, 8, 11]; L = sum(b^2), dL/db = 2b = [4, 16, 22].
  // dL/da = 2 dL/db = [8, 32, 44]; dL/dx = 3 dL/db[1:3] = [48, 66].
  Tensor a = ones({3}, kFloat64).requires_grad_();
  Tensor x = tensor({2, 3}, {2}).requires_grad_();
  Tensor b = a * 2.0;
  b.narrow(0, 1, 2).add_(x, 3.0);
  (b * b).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({8, 32, 44}, {3})));
  ASSERT_TRUE(x.grad().defined());  // was: no gradient at all
  EXPECT_TRUE(close(x.grad(), tensor({48, 66}, {2})));
}

TEST(Views, ReadingAViewAfterItsBaseChangedInPlaceSeesTheNewHistory) {
  // v = b[0] taken before b *= 3: v = 3 a0, dv/da = [3, 0].
  Tensor a = ones({2}, kFloat64).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v = b[0];
  b.mul_(3.0);
  EXPECT_DOUBLE_EQ(v.item(), 3.0);
  EXPECT_EQ(v.grad_fn_name(), "AsStridedBackward");  // regenerated from the base
  v.backward();
  EXPECT_TRUE(close(a.grad(), tensor({3, 0}, {2})));  // was [1, 0]
}

TEST(Views, InPlaceOnAViewOfALeafThatRequiresGradIsRefused) {
  Tensor x = ones({2}, kFloat64).requires_grad_();
  EXPECT_THROW_MSG(x[0].mul_(5.0), AutogradError, "mul_",
                   "a view of a leaf Variable that requires grad is being used in an in-place operation");
  EXPECT_THROW_MSG(x.narrow(0, 0, 1).add_(1.0), AutogradError, "a view of a leaf Variable");
  EXPECT_THROW_MSG(x.view({2, 1}).t()[0].fill_(0.0), AutogradError, "a view of a leaf Variable");  // view of a view
  EXPECT_THROW_MSG(x.mul_(5.0), AutogradError, "a leaf Variable that requires grad is being used in an in-place");
  EXPECT_TRUE(close(x, tensor({1, 1}, {2})));  // nothing was written
  // A leaf that does not require grad, and the same writes under no_grad (optimizer steps), are fine.
  Tensor plain = ones({2}, kFloat64);
  plain[0].mul_(5.0);
  EXPECT_TRUE(close(plain, tensor({5, 1}, {2})));
  Tensor v = x[1];  // made with grad mode on, written under no_grad: not recorded, allowed
  {
    NoGradGuard g;
    x[0].mul_(5.0);
    v.add_(1.0);
  }
  EXPECT_TRUE(close(x, tensor({5, 2}, {2})));
  EXPECT_TRUE(x.is_leaf());
  // A view of a plain leaf made to require grad itself is refused the same way (its gradient would be lost).
  Tensor base = zeros({2}, kFloat64);
  Tensor leaf_view = base[0];
  leaf_view.requires_grad_();
  EXPECT_THROW_MSG(leaf_view.add_(1.0), AutogradError, "a view of a leaf Variable");
}

// ---- CopySlices and view regeneration

TEST(Views, ViewsOfViewsShareTheRootBase) {
  // a = c = [[1,2,3],[4,5,6]], x = [2, -1]; w = b.t()[1] = b[:, 1] = [2, 5]; w *= x -> b[:, 1] = [4, -5].
  // L = sum(b * c): dL/da = c except column 1 = c[:, 1] * x = [4, -5]; dL/dx = c[:, 1] * b_old[:, 1] = [4, 25].
  Tensor a = tensor({1, 2, 3, 4, 5, 6}, {2, 3}).requires_grad_();
  Tensor c = tensor({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor x = tensor({2, -1}, {2}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor w = b.t()[1];
  EXPECT_TRUE(is_view(w));
  EXPECT_TRUE(view_base(w).is_same(b));
  EXPECT_TRUE(view_base(b.t()).is_same(b));
  EXPECT_FALSE(is_view(b));
  w.mul_(x);
  EXPECT_TRUE(close(b, tensor({1, 4, 3, 4, -5, 6}, {2, 3})));
  (b * c).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({1, 4, 3, 4, -5, 6}, {2, 3})));
  EXPECT_TRUE(close(x.grad(), tensor({4, 25}, {2})));
}

TEST(Views, AWriteThroughOneViewIsSeenThroughAnother) {
  // a = [1, 2, 3, 4], b = a * 1; v1 = b[0:2], v2 = b[1:3] overlap at b[1]. v1 *= 3 -> b = [3, 6, 3, 4].
  // L = sum(v2^2) = (3 a1)^2 + a2^2: dL/da = [0, 18 a1, 2 a2, 0] = [0, 36, 6, 0].
  Tensor a = tensor({1, 2, 3, 4}, {4}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v1 = b.narrow(0, 0, 2), v2 = b.narrow(0, 1, 2);
  v1.mul_(3.0);
  EXPECT_TRUE(close(v2, tensor({6, 3}, {2})));
  (v2 * v2).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({0, 36, 6, 0}, {4})));
}

TEST(Views, TheModifiedViewItselfCarriesTheNewHistory) {
  // v = b[1:3] *= x then read v: v = a[1:3] * x, dL/da = [0, x0, x1], dL/dx = a[1:3].
  Tensor a = tensor({1, 2, 3}, {3}).requires_grad_();
  Tensor x = tensor({5, 7}, {2}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v = b.narrow(0, 1, 2);
  v.mul_(x);
  EXPECT_EQ(v.grad_fn_name(), "AsStridedBackward");
  v.sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({0, 5, 7}, {3})));
  EXPECT_TRUE(close(x.grad(), tensor({2, 3}, {2})));
}

TEST(Views, CopyIntoRowsOfATensorWithoutHistoryBuildsADifferentiableTensor) {
  // b = zeros; b[0] = x, b[1] = x^2; L = sum(b * w): dL/dx = w[0] + 2 x w[1].
  Tensor x = tensor({1, 2, 3}, {3}).requires_grad_();
  Tensor w = tensor({1, 2, 3, 4, 5, 6}, {2, 3});
  Tensor b = zeros({2, 3}, kFloat64);
  b[0].copy_(x);
  b[1].copy_(x * x);
  EXPECT_TRUE(b.requires_grad());
  EXPECT_EQ(b.grad_fn_name(), "CopySlices");
  (b * w).sum().backward();
  EXPECT_TRUE(close(x.grad(), tensor({1 + 2 * 1 * 4, 2 + 2 * 2 * 5, 3 + 2 * 3 * 6}, {3})));
}

TEST(Views, OverwrittenRegionGetsNoGradientFromTheOldHistory) {
  // b = 2a, b[0:2] = y -> b = [5, 6, 6]; L = sum(b^2): dL/da = [0, 0, 2*6*2], dL/dy = [10, 12].
  Tensor a = tensor({1, 2, 3}, {3}).requires_grad_();
  Tensor y = tensor({5, 6}, {2}).requires_grad_();
  Tensor b = a * 2.0;
  b.narrow(0, 0, 2).copy_(y);
  (b * b).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({0, 0, 24}, {3})));
  EXPECT_TRUE(close(y.grad(), tensor({10, 12}, {2})));
  // fill_ cuts the region the same way.
  Tensor a2 = tensor({1, 2, 3}, {3}).requires_grad_();
  Tensor b2 = a2 * 2.0;
  b2[2].fill_(9.0);
  (b2 * b2).sum().backward();
  EXPECT_TRUE(close(a2.grad(), tensor({8, 16, 0}, {3})));
}

TEST(Views, FillThroughAnExpandedViewCutsTheRegion) {
  // b = 2a (2 x 3); b[0:1].expand(4, 3) = 5 writes row 0; L = sum(b^2): dL/da = [0, 0, 0; 8 a1].
  Tensor a = tensor({1, 2, 3, 4, 5, 6}, {2, 3}).requires_grad_();
  Tensor b = a * 2.0;
  b.narrow(0, 0, 1).expand({4, 3}).fill_(5.0);
  EXPECT_TRUE(close(b, tensor({5, 5, 5, 8, 10, 12}, {2, 3})));
  (b * b).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({0, 0, 0, 32, 40, 48}, {2, 3})));
}

TEST(Views, ExpandedViewReadAfterItsBaseChangedSumsItsGradient) {
  // e = b.expand(4, 3) with b = 2a after b *= 2: L = sum(e) = 4 * sum(b), dL/da = 4 * 2 = 8 each.
  Tensor a = tensor({1, 2, 3}, {1, 3}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor e = b.expand({4, 3});
  b.mul_(2.0);
  e.sum().backward();
  EXPECT_TRUE(close(a.grad(), full({1, 3}, 8.0, kFloat64)));
}

TEST(Views, OverlappingStridedViewReadAfterItsBaseChangedAddsUpItsGradient) {
  // v[i][k] = b[i + k] (windows of 2 over 4 elements), b = 2a after b *= 2; L = sum(v * w).
  // dL/da_j = 2 * sum of w[i][k] over i + k = j: w = [[1,2],[3,4],[5,6]] -> 2 * [1, 2+3, 4+5, 6].
  Tensor a = tensor({1, 2, 3, 4}, {4}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v = b.as_strided({3, 2}, {1, 1});
  b.mul_(2.0);
  EXPECT_EQ(v.grad_fn_name(), "AsStridedBackward");
  (v * tensor({1, 2, 3, 4, 5, 6}, {3, 2})).sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({2, 10, 18, 12}, {4})));
}

TEST(Views, RetainedGradOfAViewSurvivesRegeneration) {
  Tensor a = tensor({1, 2}, {2}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v = b[1];
  v.retain_grad();
  b.mul_(2.0);
  (v * 3.0).backward();
  ASSERT_TRUE(v.grad().defined());
  EXPECT_DOUBLE_EQ(v.grad().item(), 3.0);
  EXPECT_TRUE(close(a.grad(), tensor({0, 6}, {2})));
}

TEST(Views, RetainedGradFollowsAnInPlaceOpToItsNewHistory) {
  // y.retain_grad(); y *= 2; L = sum(3 y): .grad is dL/d(new y) = 3, a.grad = 6 (PyTorch moves the hook).
  Tensor a = tensor({1, 2}, {2}).requires_grad_();
  Tensor y = a * 1.0;
  y.retain_grad();
  y.mul_(2.0);
  (y * 3.0).sum().backward();
  EXPECT_TRUE(close(y.grad(), tensor({3, 3}, {2})));
  EXPECT_TRUE(close(a.grad(), tensor({6, 6}, {2})));
}

TEST(Views, CopySlicesFollowsRetainGraphRules) {
  Tensor a = tensor({1, 2}, {2}).requires_grad_();
  Tensor b = a * 1.0;
  b[0].mul_(a[1]);  // b = [a0 a1, a1]
  Tensor l = b.sum();
  l.backward(Tensor(), /*retain_graph=*/true);
  EXPECT_TRUE(close(a.grad(), tensor({2, 2}, {2})));  // [a1, a0 + 1]
  l.backward();
  EXPECT_TRUE(close(a.grad(), tensor({4, 4}, {2})));
  EXPECT_THROW_MSG(l.backward(), AutogradError, "backward through the graph a second time");
}

// ---- errors PyTorch raises

TEST(Views, InPlaceOnAnExpandedViewIsRefused) {
  Tensor t = zeros({1}, kFloat64);
  Tensor e = t.expand({3});
  EXPECT_THROW_MSG(e.add_(1.0), ValueError, "add_", "more than one element of the written-to tensor",
                   "single memory location");
  EXPECT_THROW_MSG(e.mul_(tensor({1, 2, 3}, {3})), ValueError, "mul_", "single memory location");
  EXPECT_THROW_MSG(e.copy_(tensor({1, 2, 3}, {3})), ValueError, "copy_", "single memory location");
  EXPECT_THROW_MSG(clamp_(e, 0.0, 1.0), ValueError, "clamp_", "single memory location");
  EXPECT_DOUBLE_EQ(t.item(), 0.0);
  e.fill_(2.0);  // one value everywhere: allowed, as in PyTorch
  EXPECT_DOUBLE_EQ(t.item(), 2.0);
  Tensor single = zeros({1, 3}, kFloat64).expand({1, 3});  // a size-1 dim does not overlap
  single.add_(1.0);
  EXPECT_TRUE(close(single, ones({1, 3}, kFloat64)));
}

TEST(Views, InPlaceFromAPartlyOverlappingViewIsRefused) {
  // Copying b[0:3] into b[1:4] element by element would read values it already overwrote.
  Tensor b = tensor({1, 2, 3, 4}, {4});
  Tensor dst = b.narrow(0, 1, 3);
  EXPECT_THROW_MSG(dst.copy_(b.narrow(0, 0, 3)), ValueError, "copy_",
                   "some elements of the input tensor", "refer to a single memory location");
  EXPECT_TRUE(close(b, tensor({1, 2, 3, 4}, {4})));
  dst.copy_(b.narrow(0, 0, 3).clone());
  EXPECT_TRUE(close(b, tensor({1, 1, 2, 3}, {4})));
  Tensor m = tensor({1, 2, 3, 4}, {2, 2});
  EXPECT_THROW_MSG(m.add_(m.t()), ValueError, "add_", "some elements of the input tensor");
  EXPECT_THROW_MSG(m.mul_(m[0]), ValueError, "mul_", "some elements of the input tensor");
  m.mul_(m);          // the same layout: fine
  m[0].copy_(m[1]);   // disjoint rows of one storage: fine
  EXPECT_TRUE(close(m, tensor({9, 16, 9, 16}, {2, 2})));
}

TEST(Views, ViewMadeInNoGradModeThenWrittenWithGradModeIsRefused) {
  Tensor a = ones({2}, kFloat64).requires_grad_();
  Tensor b = a * 1.0;
  Tensor v, vv;
  {
    NoGradGuard g;
    v = b[0];
    vv = b.view({2, 1});
  }
  EXPECT_THROW_MSG(v.mul_(2.0), AutogradError, "a view was created in no_grad mode", "modified in-place");
  EXPECT_THROW_MSG(vv[0].mul_(2.0), AutogradError, "no_grad mode");  // a view of it inherits the mode
  // Without anything requiring grad there is nothing to record and nothing to refuse.
  Tensor plain = zeros({2}, kFloat64);
  Tensor pv;
  {
    NoGradGuard g;
    pv = plain[1];
  }
  pv.add_(4.0);
  EXPECT_TRUE(close(plain, tensor({0, 4}, {2})));
}

TEST(Views, InPlaceOnOneOfSeveralViewsIsRefused) {
  Tensor a = ones({4}, kFloat64).requires_grad_();
  Tensor b = a * 1.0;
  EXPECT_THROW_MSG(b.chunk(2)[0].mul_(2.0), AutogradError, "output 0 of chunk", "several views");
  EXPECT_THROW_MSG(b.split(3)[1].add_(1.0), AutogradError, "output 1 of split");
  EXPECT_THROW_MSG(b.split_with_sizes({1, 3})[1].add_(1.0), AutogradError, "output 1 of split_with_sizes");
  EXPECT_TRUE(close(b, ones({4}, kFloat64)));
  Tensor plain = zeros({4}, kFloat64);  // nothing recorded: allowed
  plain.chunk(2)[1].add_(1.0);
  EXPECT_TRUE(close(plain, tensor({0, 0, 1, 1}, {4})));
  {
    NoGradGuard g;
    b.chunk(2)[0].mul_(2.0);
  }
  EXPECT_TRUE(close(b, tensor({2, 2, 1, 1}, {4})));
}

TEST(Views, DetachInPlaceOfAViewIsRefused) {
  Tensor a = ones({2}, kFloat64).requires_grad_();
  Tensor v = (a * 1.0)[0];
  EXPECT_THROW_MSG(v.detach_(), AutogradError, "can't detach views in-place");
  EXPECT_TRUE(v.detach().defined());
}

// ---- no_grad and version counters

TEST(Views, NoGradWritesThroughViewsRecordNothing) {
  Tensor a = ones({2}, kFloat64).requires_grad_();
  Tensor b = a * 1.0;
  auto before = b.grad_fn();
  {
    NoGradGuard g;
    b[0].mul_(10.0);
  }
  EXPECT_EQ(b.grad_fn(), before);
  EXPECT_TRUE(close(b, tensor({10, 1}, {2})));
  b.sum().backward();
  EXPECT_TRUE(close(a.grad(), tensor({1, 1}, {2})));  // the untracked write adds no factor
}

TEST(Views, BaseAndViewsShareOneVersionCounter) {
  Tensor b = zeros({2, 2}, kFloat64);
  Tensor v = b[1], w = b.t();
  uint32_t v0 = b.version();
  v.add_(1.0);
  EXPECT_GT(b.version(), v0);
  EXPECT_EQ(v.version(), b.version());
  EXPECT_EQ(w.version(), b.version());
  b.mul_(2.0);
  EXPECT_EQ(v.version(), b.version());
}

TEST(Views, WriteThroughAViewOfASavedTensorIsDetected) {
  Tensor a = tensor({1, 2}, {2}).requires_grad_();
  Tensor b = a * 1.0;
  Tensor c = b * b;  // saves b
  b[0].add_(1.0);
  EXPECT_THROW_MSG(c.sum().backward(), AutogradError, "modified by an inplace operation");
  // A saved view, its base written under no_grad.
  Tensor a2 = tensor({1, 2}, {2}).requires_grad_();
  Tensor b2 = a2 * 1.0;
  Tensor v = b2[0];
  Tensor c2 = v * v;  // saves v
  {
    NoGradGuard g;
    b2[1].mul_(2.0);
  }
  EXPECT_THROW_MSG(c2.backward(), AutogradError, "modified by an inplace operation");
}

TEST(Views, OptimizerStyleUpdatesThroughViewsUnderNoGrad) {
  // A parameter updated through views under no_grad keeps working as a leaf, and its views read later
  // still reach its AccumulateGrad.
  Tensor p = tensor({1, 2, 3, 4}, {2, 2}).requires_grad_();
  Tensor row = p[1];
  {
    NoGradGuard g;
    p[0].add_(tensor({1, 1}, {2}), -0.5);
    row.mul_(2.0);
  }
  EXPECT_TRUE(p.is_leaf());
  EXPECT_TRUE(close(p, tensor({0.5, 1.5, 6, 8}, {2, 2})));
  (row * row).sum().backward();
  EXPECT_TRUE(close(p.grad(), tensor({0, 0, 12, 16}, {2, 2})));
}

// ---- finite differences on composite programs

TEST(Views, GradcheckInPlaceThroughViewsOfViews) {
  Generator gen(7);
  Tensor a = (rand({3, 4}, kFloat64, &gen) + 0.5).requires_grad_();
  Tensor x = (rand({3}, kFloat64, &gen) + 0.5).requires_grad_();
  auto r = gradcheck([](const TensorList& in) {
    Tensor b = in[0] * 1.5;
    b.select(1, 1).mul_(in[1]);                           // a column times x
    b.narrow(1, 2, 2).add_(exp(in[1]).unsqueeze(1));      // two columns plus a broadcast exp(x)
    b.t()[0].copy_(sin(in[1]) * in[0].select(1, 3));      // column 0 overwritten
    Tensor v = b.t();                                     // read after all the writes
    return TensorList{v * v, sin(b)};
  }, {a, x});
  EXPECT_TRUE(r.ok) << r.report();
}

TEST(Views, GradcheckReadsAfterWritesThroughBaseAndViews) {
  Generator gen(8);
  Tensor a = (rand({4, 3}, kFloat64, &gen) + 0.5).requires_grad_();
  Tensor x = (rand({3}, kFloat64, &gen) + 0.5).requires_grad_();
  auto r = gradcheck([](const TensorList& in) {
    Tensor b = in[0].clone();
    Tensor w = b.view({12}).narrow(0, 3, 6).view({2, 3});  // rows 1..2 of b through two views
    Tensor early = b[3];                                   // read before any write
    w.mul_(in[1]);
    b.mul_(b);                                             // the base, aliasing itself
    Tensor e = b.narrow(0, 0, 1).expand({2, 3});           // expanded view of row 0
    b[0].add_(in[1], 2.0);
    Tensor last = b[3];
    clamp_(last, 0.0, 1.5);
    return TensorList{w * 2.0, early * 1.0, e * 1.0, b};
  }, {a, x});
  EXPECT_TRUE(r.ok) << r.report();
}

TEST(Views, GradcheckFillAndCopyIntoViewsOfAFreshTensor) {
  Generator gen(9);
  Tensor x = (rand({2, 3}, kFloat64, &gen) + 0.5).requires_grad_();
  auto r = gradcheck([](const TensorList& in) {
    Tensor b = zeros({3, 3}, kFloat64);
    b.narrow(0, 0, 2).copy_(in[0]);
    b[2].copy_(sum(in[0], {0}) * in[0][1]);
    b.t()[1].fill_(0.5);
    return TensorList{b * b};
  }, {x});
  EXPECT_TRUE(r.ok) << r.report();
}

}  // namespace
}  // namespace fg
