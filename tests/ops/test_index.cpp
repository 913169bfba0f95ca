#include "tests/ops/fd_check.h"

namespace fg {
namespace {
using testing::close;
using testing::fd_check;
using testing::noise;
using testing::tensor;

Tensor idx(std::vector<int64_t> v, Shape s) { return from_vector(v, s, kInt64); }

TEST(Index, IndexSelectGatherOnStridedInputs) {
  Tensor x = arange(0, 12, 1, kFloat64).view({3, 4});
  EXPECT_TRUE(close(index_select(x, 0, idx({2, 0, 2}, {3})), tensor({8, 9, 10, 11, 0, 1, 2, 3, 8, 9, 10, 11}, {3, 4})));
  EXPECT_TRUE(close(index_select(x.t(), 1, from_vector(std::vector<int32_t>{1}, {1}, kInt32)),
                    tensor({4, 5, 6, 7}, {4, 1})));
  EXPECT_TRUE(close(gather(x, 1, idx({3, 0, 1, 1, 2, 2}, {3, 2})), tensor({3, 0, 5, 5, 10, 10}, {3, 2})));
  EXPECT_TRUE(close(gather(x.slice(1, 0, 4, 2), 0, idx({2, 0}, {1, 2})), tensor({8, 2}, {1, 2})));
  EXPECT_THROW_MSG(index_select(x, 0, idx({3}, {1})), IndexError, "index_select", "index 3", "size 3");
  EXPECT_THROW_MSG(gather(x, 1, idx({-1}, {1, 1})), IndexError, "gather", "-1");
  EXPECT_THROW_MSG(index_select(x, 0, tensor({0}, {1})), DTypeError, "index_select", "float64");
}

TEST(Index, ScatterAddAndIndexAddAccumulateDuplicates) {
  Tensor base = zeros({2, 3}, kFloat64);
  Tensor s = scatter_add(base, 1, idx({0, 0, 2, 1, 1, 1}, {2, 3}), tensor({1, 2, 3, 4, 5, 6}, {2, 3}));
  EXPECT_TRUE(close(s, tensor({3, 0, 3, 0, 15, 0}, {2, 3})));
  Tensor a = index_add(ones({3, 2}, kFloat64), 0, idx({2, 2, 0}, {3}), tensor({1, 2, 3, 4, 5, 6}, {3, 2}));
  EXPECT_TRUE(close(a, tensor({6, 7, 1, 1, 5, 7}, {3, 2})));
  EXPECT_THROW_MSG(index_add(ones({3, 2}), 0, idx({0}, {1}), ones({2, 2})), ShapeError, "index_add", "[2, 2]");
}

TEST(Index, EmbeddingAndItsDeterministicGradient) {
  Tensor w = noise({10, 64}, kFloat32, 1).requires_grad_(true);
  Tensor ids = cast(floor(sin(arange(0, 4000, 1, kFloat64) * 1.7) * 4.99 + 5), kInt64);
  Tensor e = embedding(w, ids.view({40, 100}));
  EXPECT_EQ(e.sizes(), (Shape{40, 100, 64}));
  e.sum().backward();
  Tensor g1 = w.grad().clone();
  w.mutable_grad() = Tensor();
  embedding(w, ids.view({40, 100})).sum().backward();
  EXPECT_TRUE(equal(g1, w.grad()));  // bit-identical run to run
  Tensor counts = zeros({10}, kFloat64);
  for (double v : ids.to_vector()) counts.set_at({static_cast<int64_t>(v)}, counts.at({static_cast<int64_t>(v)}) + 1);
  EXPECT_TRUE(close(g1.select(1, 5), counts));
  EXPECT_THROW_MSG(embedding(w, idx({10}, {1})), IndexError, "index 10", "size 10");
}

TEST(Index, CatStackIndexMaskedOneHotTriangles) {
  Tensor a = tensor({1, 2, 3, 4}, {2, 2}), b = tensor({5, 6}, {2, 1}, kFloat32);
  Tensor c = cat({a, b}, 1);
  EXPECT_EQ(c.dtype(), kFloat64);
  EXPECT_TRUE(close(c, tensor({1, 2, 5, 3, 4, 6}, {2, 3})));
  EXPECT_THROW_MSG(cat({a, b}, 0), ShapeError, "cat", "dimension 0");
  EXPECT_TRUE(close(stack({a, a.t()}, 1), tensor({1, 2, 1, 3, 3, 4, 2, 4}, {2, 2, 2})));
  EXPECT_TRUE(close(index(a, idx({-1, 0, 1}, {3})), tensor({3, 4, 1, 2, 3, 4}, {3, 2})));
  EXPECT_THROW_MSG(index(a, idx({2}, {1})), IndexError, "index 2", "size 2");
  EXPECT_TRUE(close(masked_select(a, tensor({1, 0}, {2}, kBool)), tensor({1, 3}, {2})));
  EXPECT_TRUE(close(one_hot(idx({2, 0}, {2}), 3), tensor({0, 0, 1, 1, 0, 0}, {2, 3})));
  EXPECT_THROW_MSG(one_hot(idx({3}, {1}), 3), IndexError, "one_hot", "3");
  Tensor m = arange(1, 10, 1, kFloat64).view({3, 3});
  EXPECT_TRUE(close(tril(m), tensor({1, 0, 0, 4, 5, 0, 7, 8, 9}, {3, 3})));
  EXPECT_TRUE(close(triu(m, 1), tensor({0, 2, 3, 0, 0, 6, 0, 0, 0}, {3, 3})));
  EXPECT_TRUE(close(tril(m.t(), -1), tensor({0, 0, 0, 2, 0, 0, 3, 6, 0}, {3, 3})));
}

TEST(Index, Gradients) {
  Tensor x = noise({4, 5}, kFloat64, 2).t();  // [5, 4] strided
  EXPECT_TRUE(fd_check([](const TensorList& in) { return index_select(in[0], 1, idx({3, 0, 3}, {3})); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return gather(in[0], 0, idx({4, 0, 4, 1, 2, 2}, {3, 2})); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) {
    return scatter_add(in[0], 0, idx({1, 1, 0, 4}, {2, 2}), in[1]); }, {x, noise({3, 3}, kFloat64, 3)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return index_add(in[0], 1, idx({1, 1}, {2}), in[1]); },
                       {x, noise({5, 2}, kFloat64, 4)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return embedding(in[0], idx({1, 1, 0, 2}, {2, 2})); },
                       {noise({3, 2}, kFloat64, 5)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return cat({in[0], in[1]}, 0); }, {x, noise({2, 4}, kFloat64, 6)}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return stack({in[0], in[0] * 2}, 2); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return index(in[0], idx({-1, 1, 1}, {3})); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return masked_select(in[0], gt(in[0], scalar_tensor(0.0, kFloat64))); }, {x}));
  EXPECT_TRUE(fd_check([](const TensorList& in) { return triu(in[0], -1); }, {x}));
}

}  // namespace
}  // namespace fg
