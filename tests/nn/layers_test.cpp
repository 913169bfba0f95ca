// Gradchecks (float64) of every layer and of the fused loss / norm ops, plus module bookkeeping, on every
// device (the gradchecks run on the device under test: finite differences of its own forward are the golden
// of its backward). NnLayersDev.ForwardBackwardMatchFloat64Cpu holds float32 runs on each device to the
// float64 CPU run.
#include <map>

#include "flexgrad/nn/nn.h"
#include "tests/nn/nn_devices.h"
#include "tests/test_util.h"

namespace fg::testing {
namespace {

using namespace fg::nn;

// Checks d(sum(f() * w))/d(params and extra inputs) numerically; w fixed random so no symmetry hides errors.
void check_grads(Module& m, const std::function<Tensor()>& f, TensorList extra = {}, Device dev = kCPU) {
  m.to(kFloat64);
  m.to(dev);
  TensorList inputs = m.parameters();
  for (auto& t : extra) inputs.push_back(t);
  Generator gen(7);
  Tensor w;
  auto fn = [&](const TensorList&) {
    Tensor y = f();
    if (!w.defined()) w = randn(y.sizes(), kFloat64, &gen).to(y.device());
    return TensorList{sum(mul(y, w))};
  };
  GradcheckResult r = gradcheck(fn, inputs, {.eps = 1e-6, .atol = 1e-6, .rtol = 1e-4});
  EXPECT_TRUE(r.ok) << m.type_name() << ": " << r.report();
}

Tensor x64(const Shape& s, uint64_t seed = 1, Device dev = kCPU) {
  Generator g(seed);
  return randn(s, kFloat64, &g).to(dev).requires_grad_(true);
}

class NnLayersDev : public NnDeviceTest {};

TEST_P(NnLayersDev, LinearEmbeddingGradcheck) {
  manual_seed(0);
  auto lin = std::make_shared<Linear>(3, 2);
  Tensor x;
  check_grads(*lin, [&] { return lin->forward(x); }, {x = x64({2, 3}, 1, dev())}, dev());
  auto emb = std::make_shared<Embedding>(5, 3);
  Tensor idx = from_vector<int64_t>({0, 4, 4, 2}, {2, 2}, kInt64).to(dev());
  check_grads(*emb, [&] { return emb->forward(idx); }, {}, dev());
}

TEST_P(NnLayersDev, NormsGradcheck) {
  auto ln = std::make_shared<LayerNorm>(4);
  auto rms = std::make_shared<RMSNorm>(4);
  Tensor x = x64({3, 4}, 1, dev());
  {
    NoGradGuard ng;  // non-trivial affine parameters
    ln->weight.copy_(from_vector<double>({0.5, 1.5, -1, 2}, {4}));
    ln->bias.copy_(from_vector<double>({0.1, -0.2, 0.3, 0}, {4}));
    rms->weight.copy_(from_vector<double>({0.5, 1.5, -1, 2}, {4}));
  }
  check_grads(*ln, [&] { return ln->forward(x); }, {x}, dev());
  check_grads(*rms, [&] { return rms->forward(x); }, {x}, dev());
}

TEST_P(NnLayersDev, LayerNormMatchesComposite) {
  Tensor x = x64({5, 6}, 3, dev());
  Tensor w = x64({6}, 4, dev()), b = x64({6}, 5, dev());
  Tensor mu = mean(x, {-1}, true);
  Tensor ref = (x - mu) / sqrt(var(x, {-1}, 0, true) + 1e-5) * w + b;
  EXPECT_TRUE(close(layer_norm(x, w, b, 1e-5), ref, 1e-10, 1e-10));
  Tensor rref = x / sqrt(mean(x * x, {-1}, true) + 1e-6) * w;
  EXPECT_TRUE(close(rms_norm(x, w, 1e-6), rref, 1e-10, 1e-10));
  EXPECT_THROW_MSG(layer_norm(x, x64({5}, 1, dev()), Tensor()), ShapeError, "weight must be [6]");
}

TEST_P(NnLayersDev, CrossEntropyMatchesCompositeAndGradchecks) {
  Tensor logits = x64({4, 5}, 9, dev());
  Tensor t = from_vector<int64_t>({1, -100, 4, 0}, {4}, kInt64).to(dev());
  for (double s : {0.0, 0.1}) {
    CrossEntropyOptions o{.ignore_index = -100, .label_smoothing = s};
    Tensor lp = log_softmax(logits, -1);
    // Reference: rows 0, 2, 3 count; smoothing mixes in the mean of -logp.
    double ref = 0;
    int64_t rows[] = {0, 2, 3}, cls[] = {1, 4, 0};
    for (int i = 0; i < 3; ++i) {
      double nll = -lp.at({rows[i], cls[i]}), smooth = 0;
      for (int c = 0; c < 5; ++c) smooth += -lp.at({rows[i], c});
      ref += (1 - s) * nll + s * smooth / 5;
    }
    EXPECT_NEAR(cross_entropy(logits, t, o).item<double>(), ref / 3, 1e-12);
    auto r = gradcheck([&](const TensorList& in) { return TensorList{cross_entropy(in[0], t, o)}; }, {logits});
    EXPECT_TRUE(r.ok) << r.report();
  }
  EXPECT_NEAR(nll_loss(log_softmax(logits, -1), t).item<double>(),
              cross_entropy(logits, t).item<double>(), 1e-12);
  EXPECT_THROW_MSG(cross_entropy(logits, from_vector<int64_t>({7, 0, 0, 0}, {4}, kInt64).to(dev())), IndexError,
                   "target 7", "5 classes");
  EXPECT_THROW_MSG(cross_entropy(logits, from_vector<int64_t>({1, 2}, {2}, kInt64).to(dev())), ShapeError, "[2]", "[4, 5]");
  Tensor g = x64({7}, 6, dev());
  for (bool th : {true, false}) {
    EXPECT_TRUE(close(gelu_fused(g, th), gelu(g, th), 1e-12, 1e-12));
    auto rg = gradcheck([&](const TensorList& in) { return TensorList{gelu_fused(in[0], th)}; }, {g});
    EXPECT_TRUE(rg.ok) << rg.report();
  }
  Tensor a = x64({3}, 1, dev()), b = x64({3}, 2, dev());
  EXPECT_NEAR(mse_loss(a, b).item<double>(), mean(square(a - b)).item<double>(), 1e-12);
}

TEST_P(NnLayersDev, MlpRopeGradcheck) {
  manual_seed(1);
  for (Activation act : {Activation::GELU, Activation::SwiGLU}) {
    auto mlp = std::make_shared<MLP>(3, 4, act);
    Tensor x = x64({2, 3}, 1, dev());
    check_grads(*mlp, [&] { return mlp->forward(x); }, {x}, dev());
  }
  auto rope = std::make_shared<RotaryEmbedding>(4, 8);
  Tensor x = x64({1, 2, 3, 4}, 1, dev());
  rope->to(kFloat64);
  rope->to(dev());
  EXPECT_EQ(rope->cos_table.device(), dev());  // buffers move with the module
  auto r = gradcheck([&](const TensorList& in) { return TensorList{rope->forward(in[0], 2)}; }, {x});
  EXPECT_TRUE(r.ok) << r.report();
  // Rotation preserves the norm of each pair and is the identity at position 0.
  Tensor y0 = rope->forward(x.detach(), 0);
  EXPECT_TRUE(close(narrow(y0, 2, 0, 1), narrow(x.detach(), 2, 0, 1), 1e-12));
  EXPECT_NEAR(sum(square(rope->forward(x.detach(), 5))).item<double>(), sum(square(x.detach())).item<double>(), 1e-5);  // tables are float32
}

TEST_P(NnLayersDev, AttentionBlockGptGradcheck) {
  manual_seed(2);
  AttentionConfig ac{.d_model = 4, .n_heads = 2, .n_kv_heads = 1, .bias = true, .rotary = true, .max_positions = 8};
  auto attn = std::make_shared<FlexMultiheadAttention>(ac);
  Tensor x = x64({1, 3, 4}, 1, dev());
  AttentionCall call;
  call.block_mask = nn::causal_block_mask(3);
  check_grads(*attn, [&] { return attn->forward(x, call); }, {x}, dev());

  BlockConfig bc;
  bc.attn = ac;
  bc.mlp_hidden = 6;
  auto block = std::make_shared<TransformerBlock>(bc);
  check_grads(*block, [&] { return block->forward(x, call); }, {x}, dev());

  GPTConfig gc{.vocab_size = 5, .context = 4, .d_model = 4, .n_layers = 1, .n_heads = 2, .mlp_hidden = 4};
  auto gpt = std::make_shared<GPT>(gc);
  Tensor idx = from_vector<int64_t>({1, 4, 0}, {1, 3}, kInt64).to(dev());
  check_grads(*gpt, [&] { return gpt->forward(idx, call); }, {}, dev());
}

TEST_P(NnLayersDev, KvCacheMatchesFullForward) {
  manual_seed(3);
  GPTConfig gc{.vocab_size = 7, .context = 8, .d_model = 8, .n_layers = 2, .n_heads = 2, .n_kv_heads = 1};
  auto gpt = std::make_shared<GPT>(gc);
  gpt->to(dev());
  gpt->eval();
  NoGradGuard ng;
  Tensor idx = from_vector<int64_t>({1, 5, 2, 6, 0}, {1, 5}, kInt64).to(dev());
  AttentionCall full;
  full.block_mask = nn::causal_block_mask(5);
  Tensor ref = gpt->forward(idx, full);
  std::vector<std::unique_ptr<KVCache>> owned;
  std::vector<KVCache*> caches;
  for (int i = 0; i < 2; ++i) {
    owned.push_back(std::make_unique<ContiguousKVCache>(1, 1, 8, 4, TensorOptions().device(dev())));
    caches.push_back(owned.back().get());
  }
  AttentionCall pre;
  pre.block_mask = nn::causal_block_mask(3);
  Tensor a = gpt->forward(narrow(idx, 1, 0, 3), pre, caches);
  Tensor b = gpt->forward(narrow(idx, 1, 3, 1), {}, caches);
  Tensor c = gpt->forward(narrow(idx, 1, 4, 1), {}, caches);
  EXPECT_TRUE(close(cat({a, b, c}, 1), ref, 1e-5, 1e-4));
  EXPECT_EQ(caches[0]->length(), 5);
  Generator g(1);
  Tensor out = gpt->generate(narrow(idx, 1, 0, 2), 12, {.temperature = 0.8, .top_k = 3, .generator = &g, .cache_factory = {}});
  EXPECT_EQ(out.size(1), 14);  // more than the context: the caches restarted on the way
  EXPECT_EQ(out.device(), dev());
  EXPECT_TRUE(equal(narrow(out, 1, 0, 2).to(kCPU), narrow(idx, 1, 0, 2).to(kCPU)));
  if (on_cuda()) {
    // The same weights and draws on the CPU give the same tokens (sampling reads the logits on the CPU).
    gpt->to(kCPU);
    Generator gc2(1);
    Tensor ref = gpt->generate(narrow(idx, 1, 0, 2).to(kCPU), 12, {.temperature = 0.8, .top_k = 3, .generator = &gc2, .cache_factory = {}});
    EXPECT_TRUE(equal(out.to(kCPU), ref));
  }
}

// Every layer's forward and backward in float32 on the device under test against the same layer (same
// initial weights) in float64 on the CPU: outputs, every parameter's gradient and the input's gradient
// within float32 tolerance (atol 5e-5, rtol 5e-4 — a wrong kernel is off by O(1)). On the CPU instance
// this checks the float32 CPU path against float64, on the CUDA one the GPU path against the CPU.
struct LayerCase {
  std::string name;
  std::function<std::shared_ptr<Module>()> make;
  std::function<Tensor(Module&, const Tensor&)> forward;
  std::function<Tensor(Device)> input;  // float64 CPU input (or int64 ids), moved by the test
};

TEST_P(NnLayersDev, ForwardBackwardMatchFloat64Cpu) {
  AttentionCall causal;
  causal.block_mask = nn::causal_block_mask(5);
  AttentionConfig ac{.d_model = 8, .n_heads = 2, .n_kv_heads = 1, .bias = true, .rotary = true, .max_positions = 8};
  BlockConfig bc;
  bc.attn = ac;
  bc.mlp_hidden = 12;
  GPTConfig gc{.vocab_size = 7, .context = 8, .d_model = 8, .n_layers = 2, .n_heads = 2, .mlp_hidden = 16};
  auto xin = [](Shape s) { return [s](Device) { Generator g(31); return randn(s, kFloat64, &g); }; };
  auto ids = [](Device) { return from_vector<int64_t>({1, 6, 2, 0, 5, 3, 3, 4, 1, 2}, {2, 5}, kInt64); };
  std::vector<LayerCase> cases{
      {"Linear", [] { return std::make_shared<Linear>(6, 5); },
       [](Module& m, const Tensor& x) { return static_cast<Linear&>(m).forward(x); }, xin({3, 6})},
      {"Embedding", [] { return std::make_shared<Embedding>(7, 4); },
       [](Module& m, const Tensor& x) { return static_cast<Embedding&>(m).forward(x); }, ids},
      {"LayerNorm", [] { return std::make_shared<LayerNorm>(6); },
       [](Module& m, const Tensor& x) { return static_cast<LayerNorm&>(m).forward(x); }, xin({4, 6})},
      {"RMSNorm", [] { return std::make_shared<RMSNorm>(6); },
       [](Module& m, const Tensor& x) { return static_cast<RMSNorm&>(m).forward(x); }, xin({4, 6})},
      {"MLP-GELU", [] { return std::make_shared<MLP>(6, 10, Activation::GELU); },
       [](Module& m, const Tensor& x) { return static_cast<MLP&>(m).forward(x); }, xin({3, 6})},
      {"MLP-SwiGLU", [] { return std::make_shared<MLP>(6, 10, Activation::SwiGLU); },
       [](Module& m, const Tensor& x) { return static_cast<MLP&>(m).forward(x); }, xin({3, 6})},
      {"Attention", [ac] { return std::make_shared<FlexMultiheadAttention>(ac); },
       [causal](Module& m, const Tensor& x) { return static_cast<FlexMultiheadAttention&>(m).forward(x, causal); },
       xin({2, 5, 8})},
      {"TransformerBlock", [bc] { return std::make_shared<TransformerBlock>(bc); },
       [causal](Module& m, const Tensor& x) { return static_cast<TransformerBlock&>(m).forward(x, causal); },
       xin({2, 5, 8})},
      {"GPT", [gc] { return std::make_shared<GPT>(gc); },
       [causal](Module& m, const Tensor& x) { return static_cast<GPT&>(m).forward(x, causal); }, ids},
  };
  const double atol = 5e-5, rtol = 5e-4;
  for (const LayerCase& c : cases) {
    SCOPED_TRACE(c.name);
    manual_seed(40);
    std::shared_ptr<Module> ref = c.make();
    manual_seed(40);
    std::shared_ptr<Module> dut = c.make();
    ref->to(kFloat64);
    dut->to(dev());
    for (auto& [n, t] : dut->named_parameters()) {
      ASSERT_EQ(t.device(), dev()) << n;
      ASSERT_EQ(t.dtype(), kFloat32) << n;
    }
    Tensor x0 = c.input(dev());
    const bool float_in = x0.is_floating_point();
    Tensor xr = float_in ? clone(x0).requires_grad_(true) : x0;
    Tensor xd = float_in ? x0.to(dev(), kFloat32).requires_grad_(true) : x0.to(dev());
    Tensor yr = c.forward(*ref, xr);
    Tensor yd = c.forward(*dut, xd);
    ASSERT_EQ(yd.device(), dev());
    ASSERT_EQ(yd.dtype(), kFloat32);
    EXPECT_TRUE(close(yd, yr, atol, rtol)) << "output";
    Generator g(32);
    Tensor w = randn(yr.sizes(), kFloat64, &g);
    sum(mul(yr, w)).backward();
    sum(mul(yd, w.to(dev(), kFloat32))).backward();
    auto pr = ref->named_parameters(), pd = dut->named_parameters();
    ASSERT_EQ(pr.size(), pd.size());
    for (size_t i = 0; i < pr.size(); ++i) {
      ASSERT_TRUE(pd[i].second.grad().defined()) << pd[i].first;
      EXPECT_EQ(pd[i].second.grad().device(), dev()) << pd[i].first;
      EXPECT_TRUE(close(pd[i].second.grad(), pr[i].second.grad(), atol, rtol)) << "grad of " << pd[i].first;
    }
    if (float_in) { EXPECT_TRUE(close(xd.grad(), xr.grad(), atol, rtol)) << "grad of the input"; }
  }
}

// Module::to(Device) moves parameters (still leaves that require grad), buffers (RoPE tables) and grads.
TEST_P(NnLayersDev, ModuleToDeviceMovesParamsBuffersAndGrads) {
  manual_seed(6);
  GPTConfig gc{.vocab_size = 5, .context = 4, .d_model = 4, .n_layers = 1, .n_heads = 2};
  auto gpt = std::make_shared<GPT>(gc);
  Tensor idx = from_vector<int64_t>({1, 4, 0}, {1, 3}, kInt64);
  sum(gpt->forward(idx)).backward();
  std::map<std::string, Tensor> grads, values;
  for (auto& [n, t] : gpt->named_parameters()) {
    grads[n] = t.grad();
    values[n] = clone(t.detach());
  }
  gpt->to(dev());
  for (auto& [n, t] : gpt->named_parameters()) {
    EXPECT_EQ(t.device(), dev()) << n;
    EXPECT_TRUE(t.is_leaf() && t.requires_grad()) << n;
    ASSERT_TRUE(t.grad().defined()) << n;
    EXPECT_EQ(t.grad().device(), dev()) << n;
    EXPECT_TRUE(equal(t.grad().to(kCPU), grads[n])) << n;
    EXPECT_TRUE(equal(t.detach().to(kCPU), values[n])) << n;
  }
  for (auto& [n, t] : gpt->named_buffers()) EXPECT_EQ(t.device(), dev()) << n;
  gpt->to(kCPU);
  for (auto& [n, t] : gpt->named_parameters()) EXPECT_TRUE(equal(t.detach(), values[n])) << n;
}

TEST(NnLayers, DropoutSeededAndEval) {
  Dropout d1(0.5, 42), d2(0.5, 42);
  Tensor x = ones({1000});
  Tensor a = d1.forward(x), b = d2.forward(x);
  EXPECT_TRUE(equal(a, b));
  const double kept = sum(ne(a, scalar_tensor(0.0))).item<double>();
  EXPECT_GT(kept, 400);
  EXPECT_LT(kept, 600);
  EXPECT_NEAR(a.at({static_cast<int64_t>(argmax(a).item<int64_t>())}), 2.0, 1e-6);
  d1.eval();
  EXPECT_TRUE(equal(d1.forward(x), x));
}

TEST(NnModule, NamesModesDtypeAndPrintout) {
  manual_seed(4);
  GPTConfig gc{.vocab_size = 11, .context = 8, .d_model = 8, .n_layers = 2, .n_heads = 2};
  auto gpt = std::make_shared<GPT>(gc);
  auto named = gpt->named_parameters();
  ASSERT_FALSE(named.empty());
  EXPECT_EQ(named[0].first, "tok_emb.weight");
  std::vector<std::string> names;
  for (auto& [n, t] : named) names.push_back(n);
  EXPECT_THAT(names, ::testing::Contains("blocks.1.attn.q_proj.weight"));
  EXPECT_THAT(names, ::testing::Contains("blocks.0.mlp.proj.weight"));
  // Rotary tables are non-persistent buffers: in named_buffers, not in the state dict.
  EXPECT_FALSE(gpt->named_buffers().empty());
  for (auto& [n, t] : gpt->state_dict()) EXPECT_EQ(n.find("rope"), std::string::npos) << n;
  // Tied embeddings: 11*8 + per block (4 * 64 attn + 2 * 8*32 mlp + 4*8 norms) + 16 final norm.
  EXPECT_EQ(gpt->num_parameters(), 88 + 2 * (256 + 512 + 32) + 16);
  gpt->eval();
  EXPECT_FALSE((*gpt->blocks)[1]->mlp->is_training());
  gpt->to(kFloat64);
  EXPECT_EQ(gpt->get("blocks.0.attn.q_proj.weight").dtype(), kFloat64);
  EXPECT_TRUE(gpt->get("blocks.0.attn.q_proj.weight").requires_grad());
  EXPECT_EQ((*gpt->blocks)[0]->attn->q_proj->weight.dtype(), kFloat64);  // the member itself was replaced
  std::string s = gpt->to_string();
  EXPECT_THAT(s, ::testing::HasSubstr("(blocks): ModuleList()"));
  EXPECT_THAT(s, ::testing::HasSubstr("(q_proj): Linear(in_features=8, out_features=8, bias=false)  [64 params]"));
  EXPECT_THROW_MSG(gpt->get("nope"), ValueError, "no parameter or buffer 'nope'");
  Tensor p = gpt->parameters()[0];
  sum(p).backward();
  EXPECT_TRUE(p.grad().defined());
  gpt->zero_grad();
  EXPECT_FALSE(p.grad().defined());
}

FG_NN_INSTANTIATE_DEVICES(NnLayersDev);

}  // namespace
}  // namespace fg::testing
