// Checkpoints (safetensors round trip, mismatch reports) and optimizer steps against hand computation.
#include <cstdio>
#include <fstream>
#include <map>

#include "flexgrad/nn/nn.h"
#include "tests/nn/nn_devices.h"
#include "tests/test_util.h"

namespace fg::testing {
namespace {

using namespace fg::nn;

TEST(NnState, SafetensorsRoundTripAllDtypes) {
  NamedTensors ts{{"f64", tensor({1.5, -2}, {2})},
                  {"f32", from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3}, kFloat32)},
                  {"f16", cast(tensor({0.5, 3}, {2}), kFloat16)},
                  {"bf16", cast(tensor({-1, 8}, {1, 2}), kBFloat16)},
                  {"i64", from_vector<int64_t>({7, -9}, {2}, kInt64)},
                  {"i32", from_vector<int32_t>({3}, {1}, kInt32)},
                  {"b", from_vector<bool>({true, false, true}, {3}, kBool)},
                  {"strided", transpose(from_vector<float>({1, 2, 3, 4, 5, 6}, {2, 3}, kFloat32), 0, 1)}};
  const std::string p = scratch_path("rt.safetensors");
  save_safetensors(p, ts, {{"format", "pt"}});
  SafetensorsFile f = load_safetensors(p);
  ASSERT_EQ(f.tensors.size(), ts.size());
  EXPECT_EQ(f.metadata.at("format"), "pt");
  for (size_t i = 0; i < ts.size(); ++i) {
    EXPECT_EQ(f.tensors[i].first, ts[i].first);
    EXPECT_EQ(f.tensors[i].second.dtype(), ts[i].second.dtype());
    EXPECT_TRUE(equal(f.tensors[i].second, ts[i].second)) << ts[i].first;
  }
  // Header layout: 8-byte length, then JSON that Python's safetensors reads.
  std::ifstream in(p, std::ios::binary);
  uint64_t n = 0;
  in.read(reinterpret_cast<char*>(&n), 8);
  std::string json(n, ' ');
  in.read(json.data(), n);
  EXPECT_THAT(json, ::testing::HasSubstr("\"f32\":{\"dtype\":\"F32\",\"shape\":[2,3],\"data_offsets\":[16,40]}"));
  EXPECT_EQ(n % 8, 0u);
}

TEST(NnState, MalformedFilesAreReported) {
  const std::string p = scratch_path("bad.safetensors");
  { std::ofstream f(p, std::ios::binary); f << "abc"; }
  EXPECT_THROW_MSG(load_safetensors(p), IOError, "too short");
  {
    std::ofstream f(p, std::ios::binary);
    std::string j = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}})";
    uint64_t n = j.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << j << "abcd";
  }
  EXPECT_THROW_MSG(load_safetensors(p), IOError, "'w' is F32 [2] (8 bytes) but its offsets span 4 bytes");
  EXPECT_THROW_MSG(load_safetensors(scratch_path("missing.safetensors")), IOError, "cannot open");
}

// Untrusted shapes whose byte size wraps (2^62 float32 elements are 2^64 bytes, i.e. 0 modulo 2^64) used to
// load over 0 bytes and crash on the first read.
TEST(NnState, ShapesWhoseByteSizeOverflowsAreRejected) {
  const std::string p = scratch_path("huge.safetensors");
  auto write = [&](const std::string& j) {
    std::ofstream f(p, std::ios::binary);
    uint64_t n = j.size();
    f.write(reinterpret_cast<const char*>(&n), 8);
    f << j;
  };
  write(R"({"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,0]}})");
  EXPECT_THROW_MSG(load_safetensors(p), IOError, "tensor 'w' has shape [4611686018427387904] that cannot be held");
  write(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}})");
  EXPECT_THROW_MSG(load_safetensors(p), IOError, "tensor 'w' has shape [4294967296, 4294967296]");
}

TEST(NnState, ModuleLoadReportsEveryMismatch) {
  manual_seed(5);
  GPTConfig gc{.vocab_size = 6, .context = 8, .d_model = 8, .n_layers = 1, .n_heads = 2};
  auto a = std::make_shared<GPT>(gc), b = std::make_shared<GPT>(gc);
  const std::string p = scratch_path("gpt.safetensors");
  save_module(*a, p);
  load_module(*b, p);
  for (auto& [n, t] : a->state_dict()) EXPECT_TRUE(equal(t, b->get(n))) << n;

  NamedTensors sd = a->state_dict();
  sd.erase(sd.begin());                                              // missing tok_emb.weight
  sd[0].second = zeros({3});                                         // wrong shape
  sd[1].second = cast(sd[1].second, kFloat64);                       // wrong dtype
  sd.emplace_back("extra.weight", zeros({1}));                       // unexpected
  try {
    b->load_state_dict(sd);
    ADD_FAILURE() << "expected ValueError";
  } catch (const ValueError& e) {
    std::string m = e.what();
    EXPECT_THAT(m, ::testing::HasSubstr("4 problem(s)"));
    EXPECT_THAT(m, ::testing::HasSubstr("missing key 'tok_emb.weight'"));
    EXPECT_THAT(m, ::testing::HasSubstr("shape mismatch for '" + sd[0].first + "': checkpoint has [3]"));
    EXPECT_THAT(m, ::testing::HasSubstr("dtype mismatch for '" + sd[1].first + "': checkpoint has float64"));
    EXPECT_THAT(m, ::testing::HasSubstr("unexpected key 'extra.weight'"));
  }
  // Non-strict ignores missing/unexpected names but still refuses wrong shapes.
  NamedTensors partial{{"norm_f.weight", full({8}, 2.0)}};
  b->load_state_dict(partial, /*strict=*/false);
  EXPECT_EQ(b->get("norm_f.weight").at({0}), 2.0);
}

// One parameter p = [1, -2] with loss sum(c * p), so grad = c each step.
Tensor param() { return tensor({1.0, -2.0}, {2}).requires_grad_(true); }
void backward_with(const Tensor& p, std::vector<double> c) { sum(mul(p, tensor(c, {2}))).backward(); }

TEST(NnOptim, SgdMomentumNesterovByHand) {
  Tensor p = param();
  SGD opt({p}, {.lr = 0.1, .momentum = 0.9, .weight_decay = 0.5, .nesterov = true});
  // step 1: g = c + wd p = [1,1] + 0.5*[1,-2] = [1.5, 0]; buf = g; update g + 0.9 buf = [2.85, 0]
  backward_with(p, {1, 1});
  opt.step();
  EXPECT_TRUE(close(p.detach(), tensor({1 - 0.285, -2.0}, {2}), 1e-12));
  // step 2: p = [0.715, -2]; g = [1 + 0.3575, 1 - 1] = [1.3575, 0]; buf = 0.9*1.5 + 1.3575 = 2.7075
  // update = 1.3575 + 0.9*2.7075 = 3.79425
  opt.zero_grad();
  backward_with(p, {1, 1});
  opt.step();
  EXPECT_TRUE(close(p.detach(), tensor({0.715 - 0.379425, -2.0}, {2}), 1e-12));
}

TEST(NnOptim, AdamAndAdamWByHand) {
  for (bool decoupled : {false, true}) {
    Tensor p = param();
    AdamOptions o{.lr = 0.1, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.1};
    std::unique_ptr<Optimizer> opt =
        decoupled ? std::unique_ptr<Optimizer>(new AdamW({p}, o)) : std::unique_ptr<Optimizer>(new Adam({p}, o));
    std::vector<double> pv{1.0, -2.0}, m{0, 0}, v{0, 0};
    const std::vector<double> c{0.5, -3};
    for (int t = 1; t <= 3; ++t) {
      opt->zero_grad();
      backward_with(p, c);
      opt->step();
      for (int i = 0; i < 2; ++i) {
        double g = c[i];
        if (decoupled) pv[i] *= 1 - 0.1 * 0.1;
        else g += 0.1 * pv[i];
        m[i] = 0.9 * m[i] + 0.1 * g;
        v[i] = 0.99 * v[i] + 0.01 * g * g;
        const double mh = m[i] / (1 - std::pow(0.9, t)), vh = v[i] / (1 - std::pow(0.99, t));
        pv[i] -= 0.1 * mh / (std::sqrt(vh) + 1e-8);
      }
      EXPECT_TRUE(close(p.detach(), tensor(pv, {2}), 1e-9, 1e-9)) << "decoupled " << decoupled << " step " << t;
    }
    // Optimizer state round trip through a safetensors file: the same step count, the same moments (the
    // hand-computed m and v above), and the next step identical to the original optimizer's.
    const std::string path = scratch_path("opt.safetensors");
    save_safetensors(path, opt->state_dict());
    Tensor q = p.detach().clone().requires_grad_(true);
    std::unique_ptr<Optimizer> fresh =
        decoupled ? std::unique_ptr<Optimizer>(new AdamW({q}, o)) : std::unique_ptr<Optimizer>(new Adam({q}, o));
    fresh->load_state_dict(load_safetensors(path).tensors);
    EXPECT_EQ(fresh->steps(), 3);
    std::map<std::string, Tensor> loaded;
    for (auto& [n, t] : fresh->state_dict()) loaded[n] = t;
    ASSERT_TRUE(loaded.count("0.exp_avg") && loaded.count("0.exp_avg_sq"));
    EXPECT_TRUE(close(loaded["0.exp_avg"], tensor(m, {2}), 1e-12, 1e-12));
    EXPECT_TRUE(close(loaded["0.exp_avg_sq"], tensor(v, {2}), 1e-12, 1e-12));
    for (Optimizer* x : {opt.get(), fresh.get()}) x->zero_grad();
    backward_with(p, c);
    backward_with(q, c);
    opt->step();
    fresh->step();
    EXPECT_TRUE(close(q.detach(), p.detach(), 0, 0)) << "decoupled " << decoupled;
    // The state of one kind of optimizer is refused by another.
    Tensor r = param();
    if (decoupled) {
      EXPECT_THROW_MSG(Adam({r}, o).load_state_dict(load_safetensors(path).tensors), ValueError, "written by AdamW",
                       "cannot be loaded into Adam");
    } else {
      EXPECT_THROW_MSG(AdamW({r}, o).load_state_dict(load_safetensors(path).tensors), ValueError, "written by Adam",
                       "cannot be loaded into AdamW");
    }
    EXPECT_THROW_MSG(SGD({r}, {}).load_state_dict(load_safetensors(path).tensors), ValueError, "cannot be loaded into SGD");
    EXPECT_THROW_MSG(SGD({q}, {}).load_state_dict({{"step", scalar_tensor(1, kInt64)}, {"5.x", zeros({2})}}),
                     ValueError, "unexpected key '5.x'", "missing key 'optimizer.SGD'");
  }
}

TEST(NnOptim, ClipAndSchedule) {
  Tensor a = tensor({3, 0}, {2}).requires_grad_(true), b = tensor({0}, {1}).requires_grad_(true);
  backward_with(a, {3, 0});
  sum(mul(b, tensor({4}, {1}))).backward();
  EXPECT_NEAR(clip_grad_norm_({a, b}, 1.0), 5.0, 1e-12);
  EXPECT_NEAR(a.grad().at({0}), 0.6, 1e-6);
  EXPECT_NEAR(b.grad().at({0}), 0.8, 1e-6);
  WarmupCosine s{.base_lr = 1.0, .warmup_steps = 10, .total_steps = 110, .min_lr = 0.1};
  EXPECT_NEAR(s.at(0), 0.1, 1e-12);
  EXPECT_NEAR(s.at(9), 1.0, 1e-12);
  EXPECT_NEAR(s.at(60), 0.55, 1e-12);
  EXPECT_NEAR(s.at(110), 0.1, 1e-12);
}

// ---------------------------------------------------------------- fused steps over devices

// The op-composed update (nn/optim.cpp before the fused kernels; torch.optim's formulas), one tensor op at
// a time over CPU tensors: the golden of the fused kernels on every device.
struct RefState {
  explicit RefState(size_t n) : buf(n), m(n), v(n) {}
  std::vector<Tensor> buf, m, v;
  int64_t t = 0;
};

void ref_sgd(std::vector<Tensor>& p, const std::vector<Tensor>& g, const SGDOptions& o, RefState& s) {
  for (size_t i = 0; i < p.size(); ++i) {
    if (!g[i].defined()) continue;
    Tensor gi = g[i];
    if (o.weight_decay != 0) gi = add(gi, p[i], o.weight_decay);
    if (o.momentum != 0) {
      s.buf[i] = s.buf[i].defined() ? add(s.buf[i] * o.momentum, gi, 1 - o.dampening) : clone(gi);
      gi = o.nesterov ? add(gi, s.buf[i], o.momentum) : s.buf[i];
    }
    p[i] = add(p[i], gi, -o.lr);
  }
}

void ref_adam(std::vector<Tensor>& p, const std::vector<Tensor>& g, const AdamOptions& o, bool decoupled, RefState& s) {
  const int64_t t = ++s.t;
  const double bc1 = 1 - std::pow(o.beta1, static_cast<double>(t)), bc2 = 1 - std::pow(o.beta2, static_cast<double>(t));
  for (size_t i = 0; i < p.size(); ++i) {
    if (!g[i].defined()) continue;
    Tensor gi = g[i];
    if (o.weight_decay != 0) {
      if (decoupled) p[i] = p[i] * (1 - o.lr * o.weight_decay);
      else gi = add(gi, p[i], o.weight_decay);
    }
    if (!s.m[i].defined()) {
      s.m[i] = zeros_like(p[i]);
      s.v[i] = zeros_like(p[i]);
    }
    s.m[i] = add(s.m[i] * o.beta1, gi, 1 - o.beta1);
    s.v[i] = add(s.v[i] * o.beta2, mul(gi, gi), 1 - o.beta2);
    Tensor denom = sqrt(s.v[i]) / std::sqrt(bc2) + o.eps;
    p[i] = add(p[i], div(s.m[i], denom), -o.lr / bc1);
  }
}

struct OptCase {
  std::string name;
  std::function<std::unique_ptr<Optimizer>(TensorList)> make;
  std::function<void(std::vector<Tensor>&, const std::vector<Tensor>&, RefState&)> ref;
};

std::vector<OptCase> opt_cases() {
  std::vector<OptCase> out;
  auto sgd = [&](std::string name, SGDOptions o) {
    out.push_back({name, [o](TensorList p) { return std::unique_ptr<Optimizer>(new SGD(std::move(p), o)); },
                   [o](std::vector<Tensor>& p, const std::vector<Tensor>& g, RefState& s) { ref_sgd(p, g, o, s); }});
  };
  auto adam = [&](std::string name, AdamOptions o, bool decoupled) {
    out.push_back({name,
                   [o, decoupled](TensorList p) {
                     return decoupled ? std::unique_ptr<Optimizer>(new AdamW(std::move(p), o))
                                      : std::unique_ptr<Optimizer>(new Adam(std::move(p), o));
                   },
                   [o, decoupled](std::vector<Tensor>& p, const std::vector<Tensor>& g, RefState& s) {
                     ref_adam(p, g, o, decoupled, s);
                   }});
  };
  sgd("sgd", {.lr = 0.1});
  sgd("sgd_wd", {.lr = 0.1, .weight_decay = 0.05});
  sgd("sgd_momentum_dampening", {.lr = 0.05, .momentum = 0.9, .dampening = 0.3, .weight_decay = 0.01});
  sgd("sgd_nesterov", {.lr = 0.05, .momentum = 0.8, .weight_decay = 0.02, .nesterov = true});
  adam("adam", {.lr = 0.01, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8}, false);
  adam("adam_l2", {.lr = 0.01, .beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1}, false);
  adam("adamw", {.lr = 0.02, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1}, true);
  return out;
}

class NnOptimDev : public NnDeviceTest {};

// Several parameters of odd sizes (40001 elements span two chunks of the kernels' table), four steps of
// fresh random gradients; parameter 3 has no gradient at the first step (skipped; its momentum buffer
// starts at step 2). Parameters and every state buffer must follow the composed formula: float64 to 1e-12
// (only the rounding of fused multiply-adds differs), float32 to 2e-6 relative. Half types are fused too
// (computed in float, rounded once per stored value): HalfTypesAreFused checks them.
TEST_P(NnOptimDev, FusedStepEqualsComposedFormula) {
  const std::vector<Shape> shapes{{7}, {3, 5}, {40001}, {1}, {2, 1, 3}};
  for (DType dt : {kFloat64, kFloat32}) {
    const double tol = dt == kFloat64 ? 1e-12 : 2e-6;
    for (const OptCase& c : opt_cases()) {
      SCOPED_TRACE(c.name + " " + dtype_name(dt));
      Generator gen(17);
      std::vector<Tensor> ref_p;
      TensorList params;
      for (const auto& s : shapes) {
        Tensor init = randn(s, dt, &gen);
        ref_p.push_back(init);
        params.push_back(clone(init).to(dev()).requires_grad_(true));
      }
      std::unique_ptr<Optimizer> opt = c.make(params);
      RefState rs(shapes.size());
      for (int step = 0; step < 4; ++step) {
        std::vector<Tensor> grads(shapes.size());
        for (size_t i = 0; i < shapes.size(); ++i) {
          if (step == 0 && i == 3) continue;
          grads[i] = randn(shapes[i], dt, &gen);
        }
        for (size_t i = 0; i < shapes.size(); ++i) params[i].set_grad(grads[i].defined() ? grads[i].to(dev()) : Tensor());
        opt->step();
        c.ref(ref_p, grads, rs);
        for (size_t i = 0; i < shapes.size(); ++i) {
          ASSERT_EQ(params[i].device(), dev());
          EXPECT_TRUE(close(params[i].detach(), ref_p[i], tol, tol)) << "step " << step << " param " << i;
        }
      }
      std::map<std::string, Tensor> st;
      for (auto& [n, t] : opt->state_dict()) st[n] = t;
      EXPECT_EQ(st.at("step").item<int64_t>(), 4);
      for (size_t i = 0; i < shapes.size(); ++i) {
        const std::string k = std::to_string(i) + ".";
        for (auto [name, ref] : {std::pair{"momentum_buffer", rs.buf[i]}, std::pair{"exp_avg", rs.m[i]},
                                 std::pair{"exp_avg_sq", rs.v[i]}}) {
          ASSERT_EQ(st.count(k + name), ref.defined() ? 1u : 0u) << k + name;
          if (!ref.defined()) continue;
          EXPECT_EQ(st[k + name].device(), dev()) << k + name;  // state lives on its parameter's device
          EXPECT_TRUE(close(st[k + name], ref, tol, tol)) << k + name;
        }
      }
    }
  }
}

// float16 / bfloat16 parameters go through the same fused kernels (computed in float, rounded once when
// stored). One plain SGD step p - lr g (with L2: g + wd p first) against the same arithmetic done here in
// double from the stored values and rounded once: equal within one ulp of the result (the rounding of g +
// wd p is the only place float and double may differ).
TEST_P(NnOptimDev, HalfTypesAreFused) {
  for (DType dt : {kFloat16, kBFloat16}) {
    for (double wd : {0.0, 0.1}) {
      SCOPED_TRACE(std::string(dtype_name(dt)) + " wd " + std::to_string(wd));
      Generator gen(5);
      Tensor p0 = randn({1001}, dt, &gen), g0 = randn({1001}, dt, &gen);
      Tensor p = clone(p0).to(dev()).requires_grad_(true);
      p.set_grad(clone(g0).to(dev()));
      SGD opt({p}, {.lr = 0.1, .weight_decay = wd});
      opt.step();
      std::vector<double> pv = p0.to_vector(), gv = g0.to_vector(), want(pv.size());
      for (size_t i = 0; i < pv.size(); ++i) want[i] = pv[i] - 0.1 * (gv[i] + wd * pv[i]);
      const double ulp = dt == kFloat16 ? 1.0 / 1024 : 1.0 / 128;  // relative spacing at the value
      EXPECT_EQ(p.dtype(), dt);
      EXPECT_TRUE(close(p.detach(), tensor(want, {1001}), 1e-4, ulp));
    }
  }
}

// clip_grad_norm_ over float64 and float32 gradients (two kernel groups) against the norm computed here in
// double over the elements; the scaled gradients are g * coef.
TEST_P(NnOptimDev, FusedClipGradNormEqualsFormula) {
  const std::vector<std::pair<Shape, DType>> specs{{{5}, kFloat64}, {{40001}, kFloat64}, {{3, 3}, kFloat32}, {{33}, kFloat32}};
  Generator gen(23);
  TensorList params;
  std::vector<Tensor> g0;
  double sq = 0;
  for (const auto& [s, dt] : specs) {
    params.push_back(zeros(s, TensorOptions().dtype(dt).device(dev())).requires_grad_(true));
    g0.push_back(randn(s, dt, &gen));
    for (double x : g0.back().to_vector()) sq += x * x;
  }
  Tensor nograd = zeros({4}, TensorOptions().dtype(kFloat64).device(dev())).requires_grad_(true);  // skipped
  params.push_back(nograd);
  const double norm = std::sqrt(sq);
  auto set = [&] {
    for (size_t i = 0; i < specs.size(); ++i) params[i].set_grad(clone(g0[i]).to(dev()));  // never aliasing g0
  };
  set();
  EXPECT_NEAR(clip_grad_norm_(params, 2 * norm), norm, 1e-12 * norm);
  for (size_t i = 0; i < specs.size(); ++i) EXPECT_TRUE(equal(params[i].grad().to(kCPU), g0[i])) << i;  // no clipping
  set();
  const double max_norm = 0.25 * norm;
  EXPECT_NEAR(clip_grad_norm_(params, max_norm), norm, 1e-12 * norm);
  const double coef = max_norm / (norm + 1e-6);
  for (size_t i = 0; i < specs.size(); ++i) {
    const double tol = specs[i].second == kFloat64 ? 1e-12 : 1e-6;
    EXPECT_EQ(params[i].grad().device(), dev());
    EXPECT_TRUE(close(params[i].grad(), g0[i].to(kFloat64) * coef, tol, tol)) << i;
  }
  EXPECT_FALSE(nograd.grad().defined());
}

// A gradient of the wrong shape, or on another device than its parameter (CUDA instance), is a typed error
// naming both, raised before any update; the refused step leaves no state behind (the next step still sees a
// fresh momentum buffer: buf = g, so p = 1 - 0.1 * 1; a stale zero buffer would give buf = 0.5 g, p = 0.95).
TEST_P(NnOptimDev, BadGradIsRefusedWithoutTrace) {
  const TensorOptions f32 = TensorOptions().dtype(kFloat32).device(dev());
  Tensor p = ones({3}, f32).requires_grad_(true);
  SGD opt({p}, {.lr = 0.1, .momentum = 0.9, .dampening = 0.5});
  p.set_grad(ones({4}, f32));
  EXPECT_THROW_MSG(opt.step(), ShapeError, "parameter 0 is [3] but its grad is [4]");
  if (on_cuda()) {
    p.set_grad(ones({3}, kFloat32));
    EXPECT_THROW_MSG(opt.step(), DeviceError, "parameter 0 is on cuda:0 but its grad is on cpu");
  }
  EXPECT_TRUE(equal(p.detach().to(kCPU), ones({3}, kFloat32)));
  EXPECT_EQ(opt.steps(), 0);
  p.set_grad(ones({3}, f32));
  opt.step();
  EXPECT_TRUE(close(p.detach(), full({3}, 0.9), 1e-7, 0));
}

// Optimizer state written on one device loads onto the parameters' device (here: a file read on the CPU).
TEST_P(NnOptimDev, OptimizerStateLoadsOntoParameterDevice) {
  AdamOptions o{.lr = 0.1, .weight_decay = 0.1};
  Tensor p = tensor({1.0, -2.0}, {2}).to(dev()).requires_grad_(true);
  AdamW opt({p}, o);
  for (int t = 0; t < 2; ++t) {
    p.set_grad(tensor({0.5, -3}, {2}).to(dev()));
    opt.step();
  }
  const std::string path = scratch_path("opt_dev.safetensors");
  save_safetensors(path, opt.state_dict());
  Tensor q = clone(p.detach()).requires_grad_(true);
  AdamW fresh({q}, o);
  fresh.load_state_dict(load_safetensors(path).tensors);
  for (auto& [n, t] : fresh.state_dict()) {
    if (n.rfind("0.", 0) == 0) {
      EXPECT_EQ(t.device(), dev()) << n;
    }
  }
  p.set_grad(tensor({0.5, -3}, {2}).to(dev()));
  q.set_grad(tensor({0.5, -3}, {2}).to(dev()));
  opt.step();
  fresh.step();
  EXPECT_TRUE(equal(q.detach().to(kCPU), p.detach().to(kCPU)));
}

FG_NN_INSTANTIATE_DEVICES(NnOptimDev);

}  // namespace
}  // namespace fg::testing
