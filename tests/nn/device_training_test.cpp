// Training on each device: a tiny GPT's losses step by step against a CPU run, a checkpoint resumed
// bitwise from a safetensors file, and the typed errors of mixing devices.
#include <cmath>
#include <cstdio>

#include "flexgrad/nn/nn.h"
#include "tests/nn/nn_devices.h"
#include "tests/test_util.h"

namespace fg::testing {
namespace {

using namespace fg::nn;

constexpr int64_t kV = 11, kL = 8, kB = 4;

GPTConfig tiny_config() {
  return {.vocab_size = kV, .context = kL, .d_model = 16, .n_layers = 2, .n_heads = 2, .mlp_hidden = 32};
}

// Counting sequences (start, start+1, ... mod V) from random starts: learnable in a few steps, so the loss
// falls visibly. Inputs [B, L-1] and next-token targets, on the CPU.
std::vector<std::pair<Tensor, Tensor>> counting_batches(int n) {
  Generator g(77);
  std::vector<std::pair<Tensor, Tensor>> out;
  for (int i = 0; i < n; ++i) {
    Tensor start = randint(0, kV, {kB, 1}, kInt64, &g);
    Tensor seq = add(start, arange(0, kL, 1, TensorOptions(kInt64))) % kV;
    out.emplace_back(narrow(seq, 1, 0, kL - 1), narrow(seq, 1, 1, kL - 1));
  }
  return out;
}

// One step of AdamW with clipping on the model's device; returns the loss before the update.
double train_step(GPT& model, Optimizer& opt, const std::pair<Tensor, Tensor>& batch, Device dev) {
  AttentionCall call;
  call.block_mask = causal_block_mask(kL - 1);
  Tensor logits = model.forward(batch.first.to(dev), call);
  Tensor loss = cross_entropy(reshape(logits, {-1, kV}), reshape(batch.second.to(dev), {-1}));
  opt.zero_grad();
  loss.backward();
  clip_grad_norm_(opt.params(), 1.0);
  opt.step();
  return loss.item<double>();
}

std::vector<double> train(Device dev, DType dtype, int steps) {
  manual_seed(21);
  auto model = std::make_shared<GPT>(tiny_config());
  model->to(dtype);
  model->to(dev);
  AdamW opt(model->parameters(), {.lr = 1e-2, .weight_decay = 0.01});
  std::vector<double> losses;
  for (const auto& b : counting_batches(steps)) losses.push_back(train_step(*model, opt, b, dev));
  return losses;
}

class NnTrainDev : public NnDeviceTest {};

// Eight steps in float32 on the device under test (dropout 0: the runs see the same model). The reference
// is the CPU run: float32 for the CUDA instance (same dtype, different kernels), float64 for the CPU one
// (so the CPU instance is not a run compared with itself). Losses agree at every step within
// 1e-4 relative + 1e-5 (float32 rounding, carried through eight Adam updates), and the loss falls.
TEST_P(NnTrainDev, TinyGptLossFallsAndMatchesCpuRun) {
  const int steps = 8;
  const std::vector<double> dut = train(dev(), kFloat32, steps);
  const std::vector<double> ref = train(kCPU, on_cuda() ? kFloat32 : kFloat64, steps);
  ASSERT_EQ(dut.size(), ref.size());
  for (int i = 0; i < steps; ++i) {
    std::printf("step %d: loss %.8f (reference %.8f)\n", i, dut[i], ref[i]);
    EXPECT_NEAR(dut[i], ref[i], 1e-4 * std::abs(ref[i]) + 1e-5) << "step " << i;
  }
  EXPECT_LT(dut.back(), 0.8 * dut.front());
}

// Train N steps, save the model and the optimizer (safetensors), continue M steps. A fresh model (other
// initial weights) and optimizer on the same device, loaded from the files, continue the same M steps with
// bitwise equal losses and parameters (the kernels are deterministic; nothing of the first run leaks).
TEST_P(NnTrainDev, CheckpointResumeIsBitwise) {
  const int n = 3, m = 3;
  const auto batches = counting_batches(n + m);
  const std::string model_path = scratch_path("resume_model_" + dev().str() + ".safetensors");
  const std::string opt_path = scratch_path("resume_opt_" + dev().str() + ".safetensors");
  const AdamOptions o{.lr = 1e-2, .weight_decay = 0.01};

  manual_seed(21);
  auto a = std::make_shared<GPT>(tiny_config());
  a->to(dev());
  AdamW opt_a(a->parameters(), o);
  for (int i = 0; i < n; ++i) train_step(*a, opt_a, batches[i], dev());
  save_module(*a, model_path);
  save_safetensors(opt_path, opt_a.state_dict());
  std::vector<double> la;
  for (int i = n; i < n + m; ++i) la.push_back(train_step(*a, opt_a, batches[i], dev()));

  manual_seed(99);
  auto b = std::make_shared<GPT>(tiny_config());
  b->to(dev());
  load_module(*b, model_path);
  AdamW opt_b(b->parameters(), o);
  opt_b.load_state_dict(load_safetensors(opt_path).tensors);
  EXPECT_EQ(opt_b.steps(), n);
  for (auto& [name, t] : b->named_parameters()) ASSERT_EQ(t.device(), dev()) << name;
  for (auto& [name, t] : opt_b.state_dict()) {
    if (name != "step" && name.rfind("optimizer.", 0) != 0) {
      ASSERT_EQ(t.device(), dev()) << name;
    }
  }
  std::vector<double> lb;
  for (int i = n; i < n + m; ++i) lb.push_back(train_step(*b, opt_b, batches[i], dev()));

  for (int i = 0; i < m; ++i) EXPECT_EQ(la[i], lb[i]) << "resumed step " << i;
  auto pa = a->named_parameters(), pb = b->named_parameters();
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t i = 0; i < pa.size(); ++i) EXPECT_TRUE(equal(pa[i].second.detach(), pb[i].second.detach())) << pa[i].first;
}

FG_NN_INSTANTIATE_DEVICES(NnTrainDev);

// Inputs on the CPU with a model on the GPU: DeviceError naming both devices, from the first layer that
// sees them.
TEST(NnDevicesCuda, MixedDevicesAreDeviceErrors) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device";
  manual_seed(3);
  auto gpt = std::make_shared<GPT>(tiny_config());
  gpt->to(kCUDA);
  Tensor idx = from_vector<int64_t>({1, 2, 3}, {1, 3}, kInt64);
  EXPECT_THROW_MSG(gpt->forward(idx), DeviceError, "idx on cpu", "model on cuda:0");
  EXPECT_THROW_MSG(gpt->generate(idx, 2), DeviceError, "prompt on cpu", "model on cuda:0");
  EXPECT_THROW_MSG(gpt->tok_emb->forward(idx), DeviceError, "indices on cpu", "weight on cuda:0");
  auto lin = std::make_shared<Linear>(3, 2);
  lin->to(kCUDA);
  EXPECT_THROW_MSG(lin->forward(ones({2, 3})), DeviceError, "cpu", "cuda:0");
  // The right mix works: the ids moved to the model's device.
  Tensor logits = gpt->forward(idx.to(kCUDA));
  EXPECT_EQ(logits.device(), kCUDA);
}

}  // namespace
}  // namespace fg::testing
