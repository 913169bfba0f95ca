// train_tiny_gpt: a character-level GPT trained on one text file with flexgrad alone.
//
//   train_tiny_gpt                       # GPL-3 text every Debian machine has, default model (< 5 min, 2 cores)
//   train_tiny_gpt --data my.txt --steps 2000 --mask document
//   train_tiny_gpt --device cuda --precision bf16 --preset gpt2-small   # 12 layers, d_model 768, context 1024
//
// Reads the text, builds the character vocabulary, holds out the last 10% for validation, trains with
// AdamW + warmup/cosine under causal (or document-causal) flex_attention, prints a live progress line
// and a held-out loss every --eval-every steps, writes the loss curves as CSV and as an SVG chart
// (loss.csv, loss.svg) and a safetensors checkpoint (model + optimizer), then samples text through the KV cache (--kv-cache contiguous, or paged:
// attended straight from a PagedAttention page pool on the model's device, --page-size tokens a page). It prints the unigram entropy
// of the text next to the final held-out loss: beating it by 1 nat/char means the model learned context.
// On a GPU (--device cuda) everything runs there; --precision bf16 trains under mixed precision (float32
// master weights and AdamW state, bfloat16 matrix products and attention: ops/autocast.h).
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "flexgrad/nn/nn.h"
#include "flexgrad/ops/ops.h"
#include "examples/cli_checks.h"
#include "examples/svg_chart.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

using namespace fg;
using Clock = std::chrono::steady_clock;

namespace {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string fmt_eta(double s) {
  if (!std::isfinite(s) || s < 0) return "--";
  return fmt::format("{}m{:02d}s", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
}

}  // namespace

// Every flexgrad error (and any other) ends here: a message and exit status 1, never an abort.
int main(int argc, char** argv) try {
  // OpenMP threads that spin while waiting (libgomp's default) are ruinous on a machine shared with
  // other work: on 2 busy cores a step went from ~0.33 s to ~3 s. The policy is read when libgomp loads,
  // before main, so when the user has not chosen one we re-execute ourselves once with it set.
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    execv("/proc/self/exe", argv);  // returns only on failure: then carry on with the default policy
  }
  CLI::App app{"Train a character-level GPT with flexgrad"};
  std::string data_path = "/usr/share/common-licenses/GPL-3", out_dir = ".", mask_kind = "causal", prompt = "The ";
  nn::GPTConfig cfg;
  // GPL-3 is 35K characters: past ~300 steps of 16 x 128 tokens the model starts memorising it (at 600
  // steps without dropout the held-out loss had risen from 2.10 back to 2.15+), so the defaults stop
  // there and use a little dropout.
  cfg.dropout = 0.1;
  int64_t steps = 300, batch = 16, eval_every = 100, eval_batches = 8, sample_len = 300, warmup = 30, top_k = 10;
  double lr = 3e-3, min_lr = 3e-4, weight_decay = 0.1, clip = 1.0, temperature = 0.8;
  std::string kv_cache = "contiguous", device_name = "cpu", precision = "fp32", preset = "tiny";
  int64_t page_size = 16;
  uint64_t seed = 1337;
  bool quiet = false, require_improvement = false;
  app.add_option("--data", data_path, "training text file")->check(CLI::ExistingFile);
  app.add_option("--out", out_dir, "directory for loss.csv, loss.svg and the checkpoint");
  app.add_option("--steps", steps, "optimizer steps")->check(cli::at_least(1));
  app.add_option("--batch", batch, "sequences per step")->check(cli::at_least(1));
  app.add_option("--context", cfg.context, "sequence length")->check(cli::at_least(1));
  app.add_option("--d-model", cfg.d_model, "model width")->check(cli::at_least(1));
  app.add_option("--layers", cfg.n_layers, "transformer blocks")->check(cli::at_least(1));
  app.add_option("--heads", cfg.n_heads, "attention heads")->check(cli::at_least(1));
  app.add_option("--kv-heads", cfg.n_kv_heads, "key/value heads (grouped-query attention; 0 = heads)")
      ->check(cli::at_least(0));
  app.add_option("--dropout", cfg.dropout, "residual dropout in [0, 1)");
  app.add_option("--lr", lr, "peak learning rate")->check(cli::greater_than(0));
  app.add_option("--min-lr", min_lr, "final learning rate of the cosine")->check(cli::at_least(0));
  app.add_option("--warmup", warmup, "linear warmup steps")->check(cli::at_least(0));
  app.add_option("--weight-decay", weight_decay, "AdamW decoupled weight decay")->check(cli::at_least(0));
  app.add_option("--clip", clip, "gradient clipping by global norm (0 = off)")->check(cli::at_least(0));
  app.add_option("--eval-every", eval_every, "held-out loss every N steps")->check(cli::at_least(1));
  app.add_option("--eval-batches", eval_batches, "batches per held-out evaluation")->check(cli::at_least(1));
  app.add_option("--mask", mask_kind, "attention: causal | document (causal within blank-line separated paragraphs)")
      ->check(CLI::IsMember({"causal", "document"}));
  app.add_option("--prompt", prompt, "sampling prompt");
  app.add_option("--sample-len", sample_len, "characters to sample")->check(cli::at_least(0));
  app.add_option("--temperature", temperature, "sampling temperature (0 = greedy)")->check(cli::at_least(0));
  app.add_option("--top-k", top_k, "sample among the k most likely characters (0 = all)")->check(cli::at_least(0));
  app.add_option("--kv-cache", kv_cache, "KV cache for sampling: contiguous | paged (PagedAttention page pool)")
      ->check(CLI::IsMember({"contiguous", "paged"}));
  app.add_option("--page-size", page_size, "tokens per page of the paged KV cache")->check(cli::at_least(1));
  app.add_option("--seed", seed, "seed for init, batches and sampling");
  app.add_option("--device", device_name, "where to train: cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--precision", precision,
                 "fp32 | bf16 (mixed precision: float32 weights and optimizer state, bfloat16 products and attention; "
                 "--device cuda)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  app.add_option("--preset", preset,
                 "model size: tiny (the defaults) | gpt2-small (12 layers, d-model 768, 12 heads, context 1024, lr 6e-4); "
                 "options given explicitly override the preset")
      ->check(CLI::IsMember({"tiny", "gpt2-small"}));
  app.add_flag("--quiet", quiet, "no live progress line");
  app.add_flag("--require-improvement", require_improvement,
               "exit with status 1 unless the final held-out loss is below the initial one (CI smoke test)");
  CLI11_PARSE(app, argc, argv);
  if (preset == "gpt2-small") {
    // GPT-2 small's shape (its 50257-token vocabulary aside: this program models characters).
    auto unless_given = [&](const char* flag, auto& field, auto value) {
      if (app.count(flag) == 0) field = value;
    };
    unless_given("--layers", cfg.n_layers, int64_t{12});
    unless_given("--d-model", cfg.d_model, int64_t{768});
    unless_given("--heads", cfg.n_heads, int64_t{12});
    unless_given("--context", cfg.context, int64_t{1024});
    unless_given("--lr", lr, 6e-4);
    unless_given("--min-lr", min_lr, 6e-5);
  }

  // ---- everything checked before any long work: options that depend on each other, the data file, the
  // output directory (created when missing, then loss.csv opened in it) ----
  auto usage_error = [](const std::string& msg) {
    std::fprintf(stderr, "train_tiny_gpt: %s\n", msg.c_str());
    return 2;
  };
  if (cfg.d_model % cfg.n_heads != 0 || (cfg.d_model / cfg.n_heads) % 2 != 0)
    return usage_error(fmt::format("--heads {} must divide --d-model {} into an even head dim (rotary embedding)",
                                   cfg.n_heads, cfg.d_model));
  if (cfg.n_kv_heads > 0 && cfg.n_heads % cfg.n_kv_heads != 0)
    return usage_error(fmt::format("--kv-heads {} must divide --heads {}", cfg.n_kv_heads, cfg.n_heads));
  if (!(cfg.dropout >= 0 && cfg.dropout < 1))
    return usage_error(fmt::format("--dropout must be in [0, 1), got {}", cfg.dropout));
  if (min_lr > lr) return usage_error(fmt::format("--min-lr {} must not exceed --lr {}", min_lr, lr));
  const Device device = device_name == "cuda" ? Device(DeviceType::CUDA, 0) : kCPU;
  if (device.type == DeviceType::CUDA && device_count(DeviceType::CUDA) == 0)
    return usage_error("--device cuda: no CUDA device (no GPU visible, or flexgrad was built without CUDA)");
  const bool bf16 = precision == "bf16";
  if (bf16 && device.type != DeviceType::CUDA)
    return usage_error("--precision bf16 needs --device cuda (the CPU kernels gain nothing from bfloat16 products)");

  // ---- data ----
  std::ifstream in(data_path, std::ios::binary);
  if (!in.good()) return usage_error(fmt::format("--data {}: cannot open the file", data_path));
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string text = ss.str();
  // Batches are windows of context + 1 characters drawn from the first 90% (training) and the last 10%
  // (held out): each part must be longer than one window.
  const int64_t held_out = static_cast<int64_t>(text.size()) - static_cast<int64_t>(text.size() * 9 / 10);
  if (held_out < cfg.context + 2)
    return usage_error(fmt::format(
        "--data {}: {} bytes leave {} held-out characters (the last 10%), fewer than --context {} + 2; use a text of at "
        "least {} bytes or a shorter --context", data_path, text.size(), held_out, cfg.context, 10 * (cfg.context + 2)));
  {
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    if (!std::filesystem::is_directory(out_dir))
      return usage_error(fmt::format("--out {}: cannot create the output directory{}", out_dir,
                                     ec ? " (" + ec.message() + ")" : std::string(" (a file is in the way)")));
  }
  std::ofstream csv(out_dir + "/loss.csv");
  if (!csv.good()) return usage_error(fmt::format("--out {}: cannot write {}/loss.csv", out_dir, out_dir));

  std::map<unsigned char, int64_t> counts;
  for (unsigned char c : text) counts[c]++;
  std::vector<unsigned char> itos;
  int64_t stoi[256];
  for (auto& [c, n] : counts) { stoi[c] = static_cast<int64_t>(itos.size()); itos.push_back(c); }
  double unigram = 0;
  for (auto& [c, n] : counts) { double p = static_cast<double>(n) / text.size(); unigram -= p * std::log(p); }
  std::vector<int64_t> ids(text.size());
  for (size_t i = 0; i < text.size(); ++i) ids[i] = stoi[static_cast<unsigned char>(text[i])];
  const int64_t n_train = static_cast<int64_t>(ids.size() * 9 / 10);
  cfg.vocab_size = static_cast<int64_t>(itos.size());
  fmt::print("data: {} ({} chars, vocab {}, {} train / {} held out); unigram entropy {:.4f} nats/char\n", data_path,
             text.size(), cfg.vocab_size, n_train, ids.size() - n_train, unigram);

  // ---- model ----
  manual_seed(seed);
  Generator init_gen(seed);
  auto model = std::make_shared<nn::GPT>(cfg, &init_gen);
  model->to(device);  // initialised on the CPU, so a seed gives the same model on every device
  fmt::print("{}", model->to_string());
  fmt::print("device {}, precision {}\n", device, bf16 ? "bf16 mixed (float32 weights and optimizer state)" : "fp32");
  nn::AdamW opt(model->parameters(), {.lr = lr, .beta1 = 0.9, .beta2 = 0.95, .eps = 1e-8, .weight_decay = weight_decay});
  nn::WarmupCosine sched{.base_lr = lr, .warmup_steps = warmup, .total_steps = steps, .min_lr = min_lr};

  const int64_t T = cfg.context;
  Generator batch_gen(seed + 1);
  // A batch of windows [B, T+1] from [lo, hi): inputs are the first T, targets the last T (on the training
  // device; the inputs also stay in `xs` on the host, where the document mask reads them).
  std::vector<int64_t> xs(batch * T), ys(batch * T);
  auto make_batch = [&](int64_t lo, int64_t hi, Generator* g, Tensor& x, Tensor& y) {
    Tensor starts = randint(lo, hi - T - 1, {batch}, kInt64, g);
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t s = starts.at({b});
      for (int64_t t = 0; t < T; ++t) { xs[b * T + t] = ids[s + t]; ys[b * T + t] = ids[s + t + 1]; }
    }
    x = to_device(from_vector(xs, {batch, T}, kInt64), device);
    y = to_device(from_vector(ys, {batch, T}, kInt64), device);
  };
  // BlockMask blocks of 64 on the CPU (less masked work in the diagonal blocks); 128 on the GPU, where the
  // fused kernels then tile 128 query rows per CTA with 4 warps (a 64-row block gives 2-warp CTAs).
  const int64_t mask_block = device.type == DeviceType::CUDA ? 128 : 64;
  const BlockMask causal = nn::causal_block_mask(T, mask_block, device);
  const int64_t newline = counts.count('\n') ? stoi['\n'] : -1;
  // The attention of one batch: causal, or causal within documents (paragraphs split at blank lines),
  // traced from a mask_mod that reads each position's document id.
  auto attention_for = [&]() {
    nn::AttentionCall call;
    if (mask_kind == "causal") {
      call.block_mask = causal;
      return call;
    }
    std::vector<int64_t> doc(batch * T);
    for (int64_t b = 0; b < batch; ++b) {
      int64_t d = 0;
      for (int64_t t = 0; t < T; ++t) {
        if (t > 0 && xs[b * T + t] == newline && xs[b * T + t - 1] == newline) ++d;
        doc[b * T + t] = d;
      }
    }
    Captured docs(to_device(from_vector(doc, {batch, T}, kInt64), device), "doc");
    call.block_mask = create_block_mask(
        [docs](Expr b, Expr, Expr q, Expr kv) { return (q >= kv) & (docs[b][q] == docs[b][kv]); }, batch, std::nullopt,
        T, T, mask_block, device);
    return call;
  };
  // Held-out loss on fixed batches (the same windows every time, so the curve is comparable).
  auto evaluate = [&]() {
    NoGradGuard ng;
    model->eval();
    Generator g(seed + 2);
    double total = 0;
    for (int64_t i = 0; i < eval_batches; ++i) {
      Tensor x, y;
      make_batch(n_train, static_cast<int64_t>(ids.size()), &g, x, y);
      AutocastGuard amp(device.type, kBFloat16, bf16);
      Tensor logits = model->forward(x, attention_for());
      total += cross_entropy(reshape(logits, {-1, cfg.vocab_size}), reshape(y, {-1})).item<double>();
    }
    model->train();
    return total / eval_batches;
  };

  csv << "step,train_loss,val_loss,lr,tokens_per_s\n";
  double val = evaluate();
  const double initial_val = val;
  fmt::print("step 0: held-out loss {:.4f}\n", val);
  csv << fmt::format("0,,{:.6f},{},\n", val, sched.at(0));
  // loss.svg beside loss.csv: the same curves as a picture, rewritten at every evaluation (viewable mid-run).
  chart::LineChart loss_chart{.title = fmt::format("train_tiny_gpt: {} layers, d_model {}, context {}, batch {}",
                                                   cfg.n_layers, cfg.d_model, T, batch),
                              .x_label = "step",
                              .y_label = "cross-entropy loss (nats/char)",
                              .series = {{.name = "train (each step's batch)", .color = "#1f77b4"},
                                         {.name = "held-out", .color = "#d62728", .markers = true}}};
  auto record_loss = [&loss_chart](int series, int64_t step, double loss) {
    loss_chart.series[series].x.push_back(static_cast<double>(step));
    loss_chart.series[series].y.push_back(loss);
  };
  const std::string svg_path = out_dir + "/loss.svg";
  record_loss(1, 0, val);
  const auto t0 = Clock::now();
  // Process CPU time as well as wall time: on a shared machine the CPU seconds per step are the
  // figure that does not depend on what else runs.
  const std::clock_t c0 = std::clock();
  double smoothed = 0;
  std::vector<double> step_s;  // each step alone (batch, forward, backward, update; no evaluation)
  for (int64_t step = 0; step < steps; ++step) {
    const auto s0 = Clock::now();
    Tensor x, y;
    make_batch(0, n_train, &batch_gen, x, y);
    Tensor loss;
    {
      AutocastGuard amp(device.type, kBFloat16, bf16);  // off unless --precision bf16
      Tensor logits = model->forward(x, attention_for());
      loss = cross_entropy(reshape(logits, {-1, cfg.vocab_size}), reshape(y, {-1}));
    }
    opt.zero_grad();
    loss.backward();
    if (clip > 0) nn::clip_grad_norm_(opt.params(), clip);
    opt.set_lr(sched.at(step));
    opt.step();
    const double l = loss.item<double>();  // waits for the step's GPU work too
    step_s.push_back(seconds_since(s0));
    smoothed = step == 0 ? l : 0.9 * smoothed + 0.1 * l;
    const double elapsed = seconds_since(t0);
    const double tps = static_cast<double>((step + 1) * batch * T) / elapsed;
    const bool do_eval = (step + 1) % eval_every == 0 || step + 1 == steps;
    record_loss(0, step + 1, l);
    if (do_eval) {
      val = evaluate();
      record_loss(1, step + 1, val);
    }
    csv << fmt::format("{},{:.6f},{},{},{:.1f}\n", step + 1, l, do_eval ? fmt::format("{:.6f}", val) : "", opt.lr(), tps);
    if (!quiet) {
      fmt::print("\rstep {:>5}/{} | loss {:.4f} | lr {:.2e} | {:.0f} tok/s | {:.0f} ms/step | ETA {}   ", step + 1, steps,
                 smoothed, opt.lr(), tps, 1000 * elapsed / (step + 1), fmt_eta(elapsed / (step + 1) * (steps - step - 1)));
      std::fflush(stdout);
    }
    if (do_eval) {
      fmt::print("{}step {}: train loss {:.4f}, held-out loss {:.4f}\n", quiet ? "" : "\n", step + 1, smoothed, val);
      std::fflush(stdout);  // visible at once even when stdout is a file or a pipe
      csv.flush();
      chart::write_svg(loss_chart, svg_path);
    }
  }
  const double train_s = seconds_since(t0);
  const double cpu_s = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC;
  fmt::print("trained {} steps in {:.1f} s ({:.1f} ms/step, {:.0f} tokens/s; {:.1f} CPU-ms/step incl. evals)\n", steps,
             train_s, 1000 * train_s / steps, steps * batch * T / train_s, 1000 * cpu_s / steps);
  {
    // Steady state: the median step after the first five (allocator and kernel caches warm), evals excluded.
    std::vector<double> steady(step_s.begin() + std::min<size_t>(5, step_s.size() - 1), step_s.end());
    std::sort(steady.begin(), steady.end());
    const double med = steady[steady.size() / 2];
    std::string mem;
#ifdef FLEXGRAD_WITH_CUDA
    if (device.type == DeviceType::CUDA)
      mem = fmt::format(", peak GPU memory {:.2f} GiB", cuda::allocator_stats(device.index).peak_allocated_bytes / 1073741824.0);
#endif
    fmt::print("steady state: median {:.1f} ms/step, {:.0f} tokens/s{}\n", 1000 * med, batch * T / med, mem);
  }
  fmt::print("unigram entropy {:.4f} nats/char | held-out loss {:.4f} | gain {:.4f} nats/char ({})\n", unigram, val,
             unigram - val, unigram - val >= 1.0 ? "goal of 1 nat met" : "below the 1 nat goal");

  nn::save_module(*model, out_dir + "/tiny_gpt.safetensors",
                  {{"vocab", std::string(itos.begin(), itos.end())}, {"steps", std::to_string(steps)}});
  nn::save_safetensors(out_dir + "/tiny_gpt_optim.safetensors", opt.state_dict());
  fmt::print("wrote {0}/loss.csv, {0}/loss.svg, {0}/tiny_gpt.safetensors, {0}/tiny_gpt_optim.safetensors\n", out_dir);

  std::vector<int64_t> p;
  for (unsigned char c : prompt) if (counts.count(c)) p.push_back(stoi[c]);
  if (p.empty()) p.push_back(0);
  Generator sample_gen(seed + 3);
  const auto s0 = Clock::now();
  Tensor out = model->generate(to_device(from_vector(p, {1, static_cast<int64_t>(p.size())}, kInt64), device), sample_len,
                               {.temperature = temperature,
                                .top_k = top_k,
                                .generator = &sample_gen,
                                .cache_factory = kv_cache == "paged" ? nn::paged_kv_cache_factory(page_size)
                                                                     : nn::contiguous_kv_cache_factory()});
  std::string sample;
  for (double v : out.to_vector()) sample.push_back(static_cast<char>(itos[static_cast<size_t>(v)]));
  fmt::print("--- sample (temperature {}, top-k {}, {:.0f} chars/s through the {} KV cache) ---\n{}\n---\n",
             temperature, top_k, sample_len / seconds_since(s0),
             kv_cache == "paged" ? fmt::format("paged ({}-token pages)", page_size) : kv_cache, sample);
  if (require_improvement && !(val < initial_val)) {
    fmt::print("held-out loss did not go down: {:.4f} -> {:.4f}\n", initial_val, val);
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "train_tiny_gpt: error: %s\n", e.what());
  return 1;
}
