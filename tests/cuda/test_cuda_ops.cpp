// The CUDA op suite: each case computes on the GPU and on the CPU from the same inputs (strided,
// broadcast, every float dtype) and compares within the dtype's tolerance (skipped with a visible message
// when no GPU is present). The CPU is the golden here, so the suite is instantiated for CUDA only: on the
// CPU it would compare a CPU call with itself. The CPU kernels have their own goldens in tests/ops.
#include <cmath>

#include "flexgrad/autograd/gradcheck.h"
#include "flexgrad/ops/ops.h"
#include "flexgrad/tensor/random.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

namespace fg {
namespace {

using fg::testing::close;

struct Tol {
  double atol, rtol;
};
Tol tol(DType t) {
  switch (t) {
    case kFloat16: return {2e-3, 2e-3};
    case kBFloat16: return {2e-2, 2e-2};
    case kFloat32: return {1e-5, 1e-4};
    default: return {1e-10, 1e-10};
  }
}
const DType kFloats[] = {kFloat16, kBFloat16, kFloat32, kFloat64};

class DeviceOps : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (device_count(GetParam()) == 0) {
      GTEST_SKIP() << "no " << (GetParam() == DeviceType::CUDA ? "CUDA" : "CPU")
                   << " device present: skipping this device's op tests";
    }
  }
  Device dev() const { return Device(GetParam(), 0); }
  // A random CPU tensor (values in [lo, hi)) and its copy on the device under test.
  std::pair<Tensor, Tensor> rnd(const Shape& s, DType t, double lo = -2, double hi = 2) {
    Tensor c = add(mul(rand(s, TensorOptions().dtype(kFloat64), &gen_), scalar_tensor(hi - lo, kFloat64)),
                   scalar_tensor(lo, kFloat64))
                   .to(t);
    return {c, c.to(dev())};
  }
  void expect_same(const Tensor& on_dev, const Tensor& on_cpu, Tol t) {
    ASSERT_EQ(on_dev.device(), dev());
    EXPECT_EQ(on_dev.dtype(), on_cpu.dtype());
    EXPECT_TRUE(close(on_dev.to(kCPU), on_cpu, t.atol, t.rtol));
  }
  Generator gen_{1234};
};

TEST_P(DeviceOps, ElementwiseBroadcastStridedAllFloatDtypes) {
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    auto [a, da] = rnd({7, 33, 5}, t);
    auto [b, db] = rnd({33, 1}, t);
    // Strided views: a transposed, b broadcast along two dims.
    Tensor at = a.transpose(0, 2), dat = da.transpose(0, 2);
    Tensor bt = b.transpose(0, 1), dbt = db.transpose(0, 1);  // [1, 33]
    expect_same(add(dat.transpose(0, 2), db), add(at.transpose(0, 2), b), tol(t));
    expect_same(mul(dat, db.expand({5, 33, 7})), mul(at, b.expand({5, 33, 7})), tol(t));
    expect_same(add(dbt, db), add(bt, b), tol(t));  // [1,33] + [33,1] -> [33,33]
    expect_same(sub(da, db, 0.5), sub(a, b, 0.5), tol(t));
    expect_same(div(da, add(abs(db), scalar_tensor(0.5, t))), div(a, add(abs(b), scalar_tensor(0.5, t))), tol(t));
    expect_same(maximum(da, db), maximum(a, b), tol(t));
    expect_same(pow(abs(da), 1.5), pow(abs(a), 1.5), tol(t));
    expect_same(remainder(da, db), remainder(a, b), Tol{tol(t).atol * 10, tol(t).rtol * 10});
    for (auto f : {&exp, &tanh, &sigmoid, &silu, &sin, &floor, &neg, &square}) expect_same(f(da), f(a), tol(t));
    expect_same(gelu(da), gelu(a), tol(t));
    expect_same(log(add(abs(da), scalar_tensor(0.1, t))), log(add(abs(a), scalar_tensor(0.1, t))), tol(t));
    expect_same(where(gt(da, db), da, db), where(gt(a, b), a, b), tol(t));
    EXPECT_TRUE(equal(lt(da, db).to(kCPU), lt(a, b)));
    expect_same(clamp(da, -0.5, 0.5), clamp(a, -0.5, 0.5), tol(t));
  }
}

// Strided operands contiguous along their innermost dim (the head transposes of attention layers): the
// vector-run path when that dim is a multiple of the vector width and aligned, the per-element path when
// it is not (odd width, or a view starting one element in). Copies must be exact.
TEST_P(DeviceOps, TransposedRunsAndTheirFallbacks) {
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    for (int64_t E : {8, 64, 6, 9}) {
      SCOPED_TRACE(E);
      auto [a, da] = rnd({2, 5, 3, E}, t);
      auto [b, db] = rnd({2, 3, 5, E}, t);
      expect_same(contiguous(da.transpose(1, 2)), contiguous(a.transpose(1, 2)), Tol{0, 0});
      expect_same(add(da.transpose(1, 2), db), add(a.transpose(1, 2), b), tol(t));
      expect_same(cast(da.transpose(1, 2), kFloat32), cast(a.transpose(1, 2), kFloat32), tol(t));
      // One element in: pointers no longer aligned to a vector.
      Tensor an = narrow(a, 3, 1, E - 1), dan = narrow(da, 3, 1, E - 1);
      expect_same(contiguous(dan.transpose(1, 2)), contiguous(an.transpose(1, 2)), Tol{0, 0});
    }
  }
}

TEST_P(DeviceOps, IntegerOpsAndDivisionByZero) {
  Tensor a = arange(-6, 6, 1, kInt64), b = full({12}, 4, kInt64);
  EXPECT_TRUE(equal(floor_divide(a.to(dev()), b.to(dev())).to(kCPU), floor_divide(a, b)));
  EXPECT_TRUE(equal(remainder(a.to(dev()), b.to(dev())).to(kCPU), remainder(a, b)));
  EXPECT_THROW_MSG(floor_divide(a.to(dev()), zeros({12}, TensorOptions(kInt64).device(dev()))), ValueError,
                   "ZeroDivisionError");
}

TEST_P(DeviceOps, CastsAndCopies) {
  auto [a, da] = rnd({4, 9}, kFloat32, -100, 100);
  for (DType t : {kBool, kInt32, kInt64, kFloat16, kBFloat16, kFloat32, kFloat64}) {
    SCOPED_TRACE(dtype_name(t));
    EXPECT_TRUE(equal(da.t().to(t).to(kCPU), a.t().to(t)));  // casts round identically
  }
  Tensor c = da.t().contiguous();
  EXPECT_TRUE(c.is_contiguous());
  EXPECT_TRUE(equal(c.to(kCPU), a.t().contiguous()));
}

TEST_P(DeviceOps, InPlaceOps) {
  auto [a, da] = rnd({6, 8}, kFloat32);
  auto [b, db] = rnd({8}, kFloat32);
  Tensor x = a.clone(), dx = da.clone();
  add_(x, b, 2), add_(dx, db, 2);
  mul_(x, 0.5), mul_(dx, 0.5);
  Tensor xs = x.slice(1, 0, 8, 2), dxs = dx.slice(1, 0, 8, 2);
  fill_(xs, 3.0), fill_(dxs, 3.0);
  expect_same(dx, x, tol(kFloat32));
  zero_(dx);
  EXPECT_EQ(sum(abs(dx)).item<double>(), 0.0);
}

TEST_P(DeviceOps, Reductions) {
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    auto [a, da] = rnd({37, 130, 3}, t);
    // Sums of ~14k terms: float32 accumulation order shows in float32 results; the half types round
    // their (float-accumulated) result once, so their own tolerance (a couple of ulps) holds.
    Tol tl = t == kFloat16 || t == kBFloat16 ? tol(t) : Tol{tol(t).atol * 50, tol(t).rtol * 10};
    expect_same(sum(da), sum(a), tl);
    expect_same(sum(da, {1}), sum(a, {1}), tl);
    expect_same(sum(da, {0}, true), sum(a, {0}, true), tl);
    expect_same(sum(da.transpose(0, 2), {2}), sum(a.transpose(0, 2), {2}), tl);
    expect_same(mean(da, {0, 2}), mean(a, {0, 2}), tl);
    expect_same(amax(da, {1}), amax(a, {1}), tol(t));
    expect_same(prod(add(mul(da, scalar_tensor(0.01, t)), scalar_tensor(1, t)), {2}),
                prod(add(mul(a, scalar_tensor(0.01, t)), scalar_tensor(1, t)), {2}), tl);
    expect_same(logsumexp(da, {1}), logsumexp(a, {1}), tl);
    expect_same(var(da, {1}), var(a, {1}), tl);
    expect_same(cumsum(da, 1), cumsum(a, 1), tl);
    EXPECT_TRUE(equal(argmax(da, 1).to(kCPU), argmax(a, 1)));
    auto [v, i] = max(da, 0);
    auto [cv, ci] = max(a, 0);
    EXPECT_TRUE(equal(i.to(kCPU), ci));
    EXPECT_TRUE(equal(v.to(kCPU), cv));
  }
  // A long reduction spread over split partials, and integer sums.
  auto [big, dbig] = rnd({3, 1 << 20}, kFloat32);
  expect_same(sum(dbig, {1}), sum(big, {1}), Tol{1e-3, 1e-5});
  Tensor ints = arange(0, 100000, 1, kInt32);
  EXPECT_EQ(sum(ints.to(dev())).item<int64_t>(), sum(ints).item<int64_t>());
  EXPECT_TRUE(any(gt(dbig, scalar_tensor(1.9, kFloat32))).item<bool>());
  Tensor nan_row = from_vector(std::vector<float>{1, NAN, 3}, {3});
  EXPECT_TRUE(std::isnan(max(nan_row.to(dev())).item<double>()));
  EXPECT_EQ(argmax(nan_row.to(dev())).item<int64_t>(), 1);
}

TEST_P(DeviceOps, SortAndTopk) {
  Tensor a = from_vector(std::vector<float>{3, 1, NAN, 2, 1, -0.0f, 0, 5}, {2, 4});
  for (bool desc : {false, true}) {
    auto [v, i] = sort(a.to(dev()), 1, desc);
    auto [cv, ci] = sort(a, 1, desc);
    EXPECT_TRUE(equal(i.to(kCPU), ci)) << "descending=" << desc;
    EXPECT_TRUE(close(v.to(kCPU), cv));
  }
  auto [r, dr] = rnd({5, 300}, kFloat64);
  auto [v, i] = topk(dr, 7, 1);
  auto [cv, ci] = topk(r, 7, 1);
  EXPECT_TRUE(equal(i.to(kCPU), ci));
  auto [sv, si] = sort(dr.t(), 0);
  auto [csv, csi] = sort(r.t(), 0);
  EXPECT_TRUE(equal(si.to(kCPU), csi));
}

TEST_P(DeviceOps, SoftmaxFamily) {
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    for (int64_t n : {5, 300, 2000, 5000, 20000}) {
      auto [a, da] = rnd({3, n}, t, -5, 5);
      expect_same(softmax(da, 1), softmax(a, 1), tol(t));
      expect_same(log_softmax(da, 1), log_softmax(a, 1), Tol{tol(t).atol * 10, tol(t).rtol * 10});
      expect_same(softmax(da.t(), 0), softmax(a.t(), 0), tol(t));  // strided rows
    }
  }
  Tensor ninf = full({2, 3}, -INFINITY, kFloat32);
  EXPECT_EQ(sum(softmax(ninf.to(dev()), 1)).item<double>(), 0.0);
  // A NaN anywhere in a row makes the row NaN (also next to -inf only, not taken for an all -inf row);
  // a +inf gives NaN (inf - inf). Written by hand, as torch.softmax gives.
  for (int64_t n : {3, 300, 5000}) {
    SCOPED_TRACE(n);
    Tensor x = full({3, n}, -INFINITY, kFloat32);
    x.set_at({0, n - 1}, NAN);
    x.set_at({1, 0}, NAN);
    x.set_at({1, n / 2}, 1.0);
    x.set_at({2, n / 2}, INFINITY);
    Tensor y = softmax(x.to(dev()), 1).to(kCPU);
    EXPECT_TRUE(all(isnan(y)).item<bool>()) << y;
  }
}

TEST_P(DeviceOps, Matmul) {
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    // Half types accumulate in float32 on both sides and round the result once: their own tolerance.
    Tol tl = t == kFloat64 ? Tol{1e-10, 1e-10} : t == kFloat32 ? Tol{1e-4, 1e-4} : tol(t);
    auto [a, da] = rnd({4, 37, 19}, t, -1, 1);
    auto [b, db] = rnd({19, 23}, t, -1, 1);
    expect_same(matmul(da, db), matmul(a, b), tl);                                   // broadcast batch
    expect_same(matmul(da.transpose(1, 2).transpose(1, 2), db.t().t()), matmul(a, b), tl);
    auto [c, dc] = rnd({4, 23, 19}, t, -1, 1);
    expect_same(bmm(da, dc.transpose(1, 2)), bmm(a, c.transpose(1, 2)), tl);         // transposed operand
    auto [e, de] = rnd({19, 46}, t, -1, 1);
    expect_same(matmul(da, de.slice(1, 0, 46, 2)), matmul(a, e.slice(1, 0, 46, 2)), tl);  // no unit stride
  }
  Tensor ia = arange(0, 12, 1, kInt64).reshape({3, 4}), ib = arange(0, 8, 1, kInt64).reshape({4, 2});
  EXPECT_TRUE(equal(matmul(ia.to(dev()), ib.to(dev())).to(kCPU), matmul(ia, ib)));
}

TEST_P(DeviceOps, IndexOpsCatStack) {
  for (DType t : {kFloat32, kFloat64, kBFloat16}) {
    SCOPED_TRACE(dtype_name(t));
    auto [w, dw] = rnd({10, 6}, t);
    Tensor idx = from_vector(std::vector<int64_t>{3, 0, 9, 3, 3}, {5}, kInt64);
    Tensor didx = idx.to(dev());
    expect_same(index_select(dw, 0, didx), index_select(w, 0, idx), tol(t));
    expect_same(embedding(dw, didx.reshape({5, 1})), embedding(w, idx.reshape({5, 1})), tol(t));
    Tensor g2 = from_vector(std::vector<int64_t>{0, 5, 5, 1, 2, 2, 3, 4, 0, 0, 1, 1}, {2, 6}, kInt64);
    Tensor g = cat({g2, g2, g2, g2, g2}, 0);  // [10, 6]
    expect_same(gather(dw, 1, g.to(dev())), gather(w, 1, g), tol(t));
    auto [src, dsrc] = rnd({10, 6}, t);
    expect_same(scatter_add(dw, 1, g.to(dev()), dsrc), scatter_add(w, 1, g, src), tol(t));
    expect_same(cat({dw, dsrc.t().t()}, 1), cat({w, src}, 1), tol(t));
    expect_same(stack({dw, dsrc}, 0), stack({w, src}, 0), tol(t));
  }
}

TEST_P(DeviceOps, DeterministicScatterAdd) {
  auto [src, dsrc] = rnd({4, 5000}, kFloat32);
  Tensor idx = full({4, 5000}, 7, kInt64).to(dev());
  Tensor base = zeros({4, 16}, TensorOptions().device(dev()));
  Tensor r1 = scatter_add(base, 1, idx, dsrc), r2 = scatter_add(base, 1, idx, dsrc);
  EXPECT_TRUE(equal(r1.to(kCPU), r2.to(kCPU)));  // bitwise identical run to run
}

TEST_P(DeviceOps, GradcheckFloat64) {
  auto [a, da] = rnd({3, 4}, kFloat64);
  auto [b, db] = rnd({4, 2}, kFloat64);
  da.requires_grad_(true), db.requires_grad_(true);
  GradcheckOptions o;
  o.raise_on_failure = true;
  EXPECT_TRUE(gradcheck([](const TensorList& x) { return TensorList{matmul(x[0], x[1])}; }, {da, db}, o).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& x) { return TensorList{log_softmax(x[0], 1)}; }, {da}, o).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& x) { return TensorList{sum(mul(tanh(x[0]), x[0]), {0})}; }, {da}, o).ok);
  EXPECT_TRUE(gradcheck([](const TensorList& x) { return TensorList{logsumexp(x[0], {1})}; }, {da}, o).ok);
  Tensor idx = from_vector(std::vector<int64_t>{1, 0, 1}, {3}, kInt64).to(dev());
  EXPECT_TRUE(gradcheck([&](const TensorList& x) { return TensorList{index_select(x[0], 1, idx)}; }, {da}, o).ok);
}

TEST_P(DeviceOps, BackwardMatchesCpu) {
  auto [a, da] = rnd({5, 7}, kFloat32);
  a.requires_grad_(true), da.requires_grad_(true);
  Tensor l = sum(mul(softmax(matmul(a, a.t()), 1), a.slice(1, 0, 5)));
  Tensor dl = sum(mul(softmax(matmul(da, da.t()), 1), da.slice(1, 0, 5)));
  l.backward(), dl.backward();
  EXPECT_TRUE(close(da.grad().to(kCPU), a.grad(), 1e-4, 1e-4));
}

TEST_P(DeviceOps, RandomValuesIdenticalToCpu) {
  // rand, randint and bernoulli are bit-identical to the CPU mapping on every device (the CUDA fill
  // kernel runs the same Philox counters); sizes span several grid-stride rounds and an odd tail.
  for (int64_t n : {int64_t{77}, int64_t{1000}, int64_t{(1 << 20) + 3}}) {
    SCOPED_TRACE(n);
    for (DType t : kFloats) {
      SCOPED_TRACE(dtype_name(t));
      Generator g1(99), g2(99);
      EXPECT_TRUE(equal(rand({n}, TensorOptions().dtype(t).device(dev()), &g2).to(kCPU), rand({n}, t, &g1)));
      EXPECT_EQ(g1.offset(), g2.offset());
    }
    for (DType t : {kInt64, kInt32, kFloat32, kFloat64, kBFloat16}) {
      SCOPED_TRACE(dtype_name(t));
      Generator g1(5), g2(5);
      EXPECT_TRUE(equal(randint(-3, 200, {n}, TensorOptions(t).device(dev()), &g2).to(kCPU), randint(-3, 200, {n}, t, &g1)));
      EXPECT_TRUE(equal(bernoulli({n}, 0.3, TensorOptions(t).device(dev()), &g2).to(kCPU), bernoulli({n}, 0.3, t, &g1)));
    }
    Generator g1(7), g2(7);
    EXPECT_TRUE(equal(randint(0, 2, {n}, TensorOptions(kBool).device(dev()), &g2).to(kCPU), randint(0, 2, {n}, kBool, &g1)));
    EXPECT_TRUE(equal(randint(int64_t{-1} << 40, int64_t{1} << 50, {n}, TensorOptions(kInt64).device(dev()), &g2).to(kCPU),
                      randint(int64_t{-1} << 40, int64_t{1} << 50, {n}, kInt64, &g1)));
  }
  // randn: the same double Box-Muller formula; CUDA's log/cos may differ from libm in the last bit of a
  // double, so compare within about one unit in the last place of the dtype (and count exact matches).
  for (DType t : kFloats) {
    SCOPED_TRACE(dtype_name(t));
    Generator g1(99), g2(99);
    const int64_t n = (1 << 18) + 5;
    Tensor c = randn({n}, TensorOptions().dtype(t), &g1);
    Tensor d = randn({n}, TensorOptions().dtype(t).device(dev()), &g2).to(kCPU);
    const double ulp = t == kFloat64 ? 1e-15 : t == kFloat32 ? 2.4e-7 : t == kFloat16 ? 1e-3 : 7.9e-3;
    EXPECT_TRUE(close(d, c, 4 * ulp, 2 * ulp));
    const double same = sum(eq(d, c).to(kFloat64)).item<double>() / static_cast<double>(n);
    // float64 keeps the last-bit differences of log/cos (about 85% bit-identical on an H100); the rounding
    // to float32 and the half types hides them all but never.
    if (t != kFloat64) EXPECT_GT(same, 0.999) << "fraction bit-identical: " << same;
    else EXPECT_GT(same, 0.5) << "fraction bit-identical: " << same;
    RecordProperty(std::string("randn_bit_identical_") + dtype_name(t), std::to_string(same));
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, DeviceOps, ::testing::Values(DeviceType::CUDA), [](const auto&) { return "cuda"; });

// ---------------------------------------------------------------- CUDA runtime services

class CudaRuntime : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping CUDA runtime tests";
  }
};

TEST(CudaDevices, UnavailableDeviceIsAReadableError) {
  int n = device_count(DeviceType::CUDA);
  EXPECT_THROW_MSG(zeros({2}, TensorOptions().device(Device(DeviceType::CUDA, n + 3))), DeviceError,
                   "cuda:" + std::to_string(n + 3), std::string("not available"));
}

#ifdef FLEXGRAD_WITH_CUDA
TEST_F(CudaRuntime, AllocatorReusesSizeClassesAndEmptiesCache) {
  cuda::synchronize();
  cuda::empty_cache();
  auto s0 = cuda::allocator_stats();
  EXPECT_EQ(s0.cached_bytes, 0u);
  EXPECT_EQ(cuda::allocation_size_class(1), 512u);
  EXPECT_EQ(cuda::allocation_size_class((1 << 20) + 1), size_t{2} << 20);
  {
    Tensor a = empty({1000}, TensorOptions().device(kCUDA));  // 4000 B -> 4096 B class
    auto s1 = cuda::allocator_stats();
    EXPECT_EQ(s1.allocated_bytes - s0.allocated_bytes, 4096u);
    EXPECT_EQ(s1.num_device_mallocs, s0.num_device_mallocs + 1);
  }
  auto s2 = cuda::allocator_stats();
  EXPECT_EQ(s2.cached_bytes, 4096u);
  Tensor b = empty({1020}, TensorOptions().device(kCUDA));  // same class: served from the cache
  auto s3 = cuda::allocator_stats();
  EXPECT_EQ(s3.num_device_mallocs, s2.num_device_mallocs);
  EXPECT_EQ(s3.num_cache_hits, s2.num_cache_hits + 1);
  EXPECT_GE(s3.peak_allocated_bytes, s3.allocated_bytes);
  b = Tensor();
  cuda::empty_cache();
  auto s4 = cuda::allocator_stats();
  EXPECT_EQ(s4.cached_bytes, 0u);
  EXPECT_EQ(s4.reserved_bytes, s4.allocated_bytes);
}

TEST_F(CudaRuntime, SyncAndAsyncCopiesThroughStagingAndPinned) {
  const int64_t n = (int64_t{20} << 20) / 4 + 3;  // several staging chunks plus a tail
  Tensor h = arange(0, static_cast<double>(n), 1, kFloat32);
  Tensor d = h.to(kCUDA);
  EXPECT_TRUE(equal(d.to(kCPU), h));
  Tensor d2 = cuda::to_device_async(h, kCUDA);
  Tensor back = cuda::to_device_async(d2, kCPU);
  cuda::synchronize();
  EXPECT_TRUE(equal(back, h));
  Tensor p = cuda::pin_memory(h);
  EXPECT_TRUE(cuda::is_pinned(p.data_ptr()));
  EXPECT_FALSE(cuda::is_pinned(h.data_ptr()));
  Tensor d3 = cuda::to_device_async(p, kCUDA);
  cuda::synchronize();
  EXPECT_TRUE(equal(d3.to(kCPU), h));
  // Strided source tensors move too.
  Tensor m = h.slice(0, 0, 4096).reshape({64, 64}).t();
  EXPECT_TRUE(equal(m.to(kCUDA).to(kCPU), m));
  // to_device(..., non_blocking): the host source may be overwritten as soon as the call returns (it was
  // staged); strided sources too; a copy to the host still waits, so it reads the device's data at once.
  Tensor src = h.clone(), keep = h.clone();
  Tensor d4 = to_device(src, kCUDA, /*non_blocking=*/true);
  src.fill_(-1.0);
  Tensor d5 = to_device(m, kCUDA, /*non_blocking=*/true);
  EXPECT_TRUE(equal(to_device(d4, kCPU, /*non_blocking=*/true), keep));
  EXPECT_TRUE(equal(d5.to(kCPU), m));
}

// The copies again, many times, at several sizes (below, at and above the staging chunk), with fresh data
// each round and nothing but the documented synchronisation: a reuse race in the staging pool or the
// allocator shows up here as a wrong element.
TEST_F(CudaRuntime, AsyncCopiesStress) {
  Generator gen(11);
  const int64_t sizes[] = {1, 1000, (int64_t{8} << 20) / 4, (int64_t{8} << 20) / 4 + 1, (int64_t{20} << 20) / 4 + 3};
  for (int round = 0; round < 6; ++round) {
    for (int64_t n : sizes) {
      SCOPED_TRACE(::testing::Message() << "round " << round << " n " << n);
      Tensor h = randint(0, 1 << 20, {n}, kFloat32, &gen);
      Tensor p = cuda::pin_memory(h);
      Tensor d1 = cuda::to_device_async(h, kCUDA);
      Tensor d2 = cuda::to_device_async(p, kCUDA);
      Tensor d3 = add(d1, d2);  // a kernel between the copies, on the same stream
      Tensor b1 = cuda::to_device_async(d1, kCPU);
      Tensor b2 = cuda::to_device_async(d3, kCPU);
      Tensor pb = cuda::pin_memory(zeros({n}));
      cuda::copy_async(pb.data_ptr(), kCPU, d2.data_ptr(), kCUDA, static_cast<size_t>(n) * 4);
      cuda::synchronize();
      EXPECT_TRUE(equal(b1, h));
      EXPECT_TRUE(equal(pb, h));
      EXPECT_TRUE(equal(b2, mul(h, scalar_tensor(2.0, kFloat32))));
      EXPECT_TRUE(equal(d2.to(kCPU), h));
      EXPECT_TRUE(equal(d3.to(kCPU), add(h, h)));
    }
  }
}

// A tensor made on one stream and last used on another: after it dies, its block is reused on the first
// stream only after the second stream's work on it.
TEST_F(CudaRuntime, CrossStreamUseBeforeFreeIsOrdered) {
  auto side = cuda::create_stream();
  const int64_t n = int64_t{16} << 20;
  Tensor src = ones({n}, TensorOptions().device(kCUDA));
  for (int i = 0; i < 4; ++i) {
    Tensor a = full({n}, 3.0, TensorOptions().device(kCUDA));  // made on the default stream
    cuda::synchronize();
    Tensor r;
    {
      cuda::StreamGuard g(side);
      r = mul(a, a);  // reads a on the side stream
      a = Tensor();   // freed while the side stream may still read it
    }
    Tensor b = mul(src, scalar_tensor(5.0, kFloat32));  // same size class: may reuse a's block
    cuda::synchronize();
    {
      cuda::StreamGuard g(side);
      cuda::synchronize();
    }
    EXPECT_EQ(amax(r).item<double>(), 9.0);
    EXPECT_EQ(amin(r).item<double>(), 9.0);
    EXPECT_EQ(amin(b).item<double>(), 5.0);
  }
  cuda::destroy_stream(side);
}

TEST_F(CudaRuntime, StreamsAreCurrentPerDevice) {
  auto s = cuda::create_stream();
  {
    cuda::StreamGuard g(s);
    EXPECT_EQ(cuda::current_stream(), s);
    Tensor a = ones({1024}, TensorOptions().device(kCUDA));
    EXPECT_EQ(sum(a).item<double>(), 1024.0);
  }
  EXPECT_NE(cuda::current_stream(), s);
  cuda::destroy_stream(s);
}

TEST_F(CudaRuntime, Tf32OnlyWhenAsked) {
  EXPECT_FALSE(cuda::allow_tf32());
  Generator g(3);
  Tensor a = randn({256, 256}, TensorOptions(), &g), b = randn({256, 256}, TensorOptions(), &g);
  Tensor ref = matmul(a.to(kFloat64), b.to(kFloat64));
  double exact_err = amax(abs(sub(matmul(a.to(kCUDA), b.to(kCUDA)).to(kCPU).to(kFloat64), ref))).item<double>();
  EXPECT_LT(exact_err, 1e-3);
  cuda::set_allow_tf32(true);
  double tf32_err = amax(abs(sub(matmul(a.to(kCUDA), b.to(kCUDA)).to(kCPU).to(kFloat64), ref))).item<double>();
  cuda::set_allow_tf32(false);
  EXPECT_GT(tf32_err, exact_err);  // TF32 has a 10-bit mantissa
}

TEST_F(CudaRuntime, CudaErrorsNameCallFileAndLine) {
  EXPECT_THROW_MSG(cuda::copy_async(nullptr, kCPU, nullptr, kCPU, 4), DeviceError, "neither");
  EXPECT_THROW_MSG(cuda::destroy_stream(nullptr, 99), DeviceError, "cuda:99");
  // A failing runtime call: an impossible allocation reports the size and the runtime's message.
  EXPECT_THROW_MSG(empty({int64_t{1} << 45}, TensorOptions().device(kCUDA)), CudaError, "out of memory");
}
#endif

}  // namespace
}  // namespace fg
