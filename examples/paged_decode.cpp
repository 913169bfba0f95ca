// Continuous-batching decode through a paged K/V cache.
//
// A one-layer toy language model (random embedding, Wq/Wk/Wv/Wo, tied output) serves a queue of requests
// with prompts of different lengths. Up to --slots sequences decode together, one token per step, all
// attending through flex_attention over one shared paged cache (PagedAttention): every step reserves room for
// the new token, assigns its K/V, and converts a per-slot length mask to the physical cache. A sequence that
// reaches its token budget is erased and the next request takes its slot (its prompt's K/V written in one
// assign: with one layer, K/V depend only on the token embeddings).
//
// --device cuda serves the same loop from the GPU: the model, the page pool and PagedAttention's tables live
// there (the decode loop hands assign / convert its slots and positions as host tensors: the tables' host
// copy answers them without a device read). --dtype bf16 keeps the cache and the attention in bfloat16 (the
// toy model's products stay float32): each step's one-token queries then run flex_attention's split-KV decode
// kernel (float32 runs the exact SIMT kernel).
//
//   paged_decode --requests 24 --slots 8 --pages 256 --page-size 32
//   paged_decode --device cuda --dtype bf16 --requests 256 --slots 64 --pages 4096 --max-prompt 1000 --max-new 200
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <deque>
#include <random>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/paged_attention.h"
#include "flexgrad/ops/ops.h"
#include "examples/cli_checks.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

using namespace fg;

namespace {

struct Request {
  int id;
  std::vector<int64_t> prompt;
  int64_t max_new;
};

struct Active {
  Request req;
  int64_t len = 0;  // tokens in the cache
  int64_t last_token = 0;
  std::vector<int64_t> generated;
};

}  // namespace

int main(int argc, char** argv) try {
  CLI::App app{"Continuous-batching decode through a paged K/V cache (flex_attention + PagedAttention)"};
  int64_t requests = 24, slots = 8, n_pages = 256, page_size = 32, vocab = 512, hq = 8, hkv = 2, e = 32;
  int64_t min_prompt = 8, max_prompt = 200, min_new = 16, max_new = 96, print_every = 16;
  uint64_t seed = 0;
  std::string device_name = "cpu", dtype_name = "fp32";
  app.add_option("--requests", requests, "number of requests to serve")->check(cli::at_least(1));
  app.add_option("--slots", slots, "batch slots decoding at once (max_batch_size)")->check(cli::at_least(1));
  app.add_option("--pages", n_pages, "physical pages in the shared cache")->check(cli::at_least(1));
  app.add_option("--page-size", page_size, "tokens per page (= kv block size)")->check(cli::at_least(1));
  app.add_option("--vocab", vocab, "vocabulary size")->check(cli::at_least(1));
  app.add_option("--hq", hq, "query heads")->check(cli::at_least(1));
  app.add_option("--hkv", hkv, "key/value heads (GQA when < hq)")->check(cli::at_least(1));
  app.add_option("--head-dim", e, "head dimension")->check(cli::at_least(1));
  app.add_option("--min-prompt", min_prompt, "shortest prompt")->check(cli::at_least(1));
  app.add_option("--max-prompt", max_prompt, "longest prompt")->check(cli::at_least(1));
  app.add_option("--min-new", min_new, "fewest generated tokens per request")->check(cli::at_least(1));
  app.add_option("--max-new", max_new, "most generated tokens per request")->check(cli::at_least(1));
  app.add_option("--print-every", print_every, "print a status line every N steps")->check(cli::at_least(1));
  app.add_option("--seed", seed, "random seed");
  app.add_option("--device", device_name, "where to serve: cpu | cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", dtype_name, "K/V cache and attention dtype: fp32 | bf16 (--device cuda)")
      ->check(CLI::IsMember({"fp32", "bf16"}));
  CLI11_PARSE(app, argc, argv);
  auto usage_error = [](const std::string& msg) {
    std::fprintf(stderr, "paged_decode: %s\n", msg.c_str());
    return 2;
  };
  if (hq % hkv != 0) return usage_error(fmt::format("--hkv {} must divide --hq {}", hkv, hq));
  if (min_prompt > max_prompt)
    return usage_error(fmt::format("--min-prompt {} exceeds --max-prompt {}", min_prompt, max_prompt));
  if (min_new > max_new) return usage_error(fmt::format("--min-new {} exceeds --max-new {}", min_new, max_new));
  // A request is admitted only when the pool can hold all of it (prompt + budget): the longest possible
  // request must fit in the whole pool, or it would wait forever.
  const int64_t longest = max_prompt + max_new, longest_pages = (longest + page_size - 1) / page_size;
  if (longest_pages > n_pages)
    return usage_error(fmt::format("--pages {} of {} tokens cannot hold the longest request (--max-prompt {} + --max-new "
                                   "{} = {} tokens need {} pages); raise --pages or --page-size, or shorten the requests",
                                   n_pages, page_size, max_prompt, max_new, longest, longest_pages));
  const Device device = device_name == "cuda" ? Device(DeviceType::CUDA, 0) : kCPU;
  if (device.type == DeviceType::CUDA && device_count(DeviceType::CUDA) == 0)
    return usage_error("--device cuda: no CUDA device (no GPU visible, or flexgrad was built without CUDA)");
  if (dtype_name == "bf16" && device.type != DeviceType::CUDA)
    return usage_error("--dtype bf16 needs --device cuda (the CPU kernels compute in float32 anyway)");
  const DType cache_dtype = dtype_name == "bf16" ? kBFloat16 : kFloat32;
  // Waits for the GPU's queued work, so the attention time is the kernels' and not their launch.
  auto sync = [&] {
#ifdef FLEXGRAD_WITH_CUDA
    if (device.type == DeviceType::CUDA) cuda::synchronize(device.index);
#endif
  };
  const int64_t d_model = hq * e, kv_dim = hkv * e;

  // The toy model: drawn on the CPU (the same weights on every device), then moved.
  manual_seed(seed);
  NoGradGuard no_grad;
  Tensor emb = randn({vocab, d_model}).to(device);
  Tensor wq = (randn({d_model, d_model}) * (1.0 / std::sqrt(double(d_model)))).to(device);
  Tensor wk = (randn({d_model, kv_dim}) * (1.0 / std::sqrt(double(d_model)))).to(device);
  Tensor wv = (randn({d_model, kv_dim}) * (1.0 / std::sqrt(double(d_model)))).to(device);
  Tensor wo = (randn({d_model, d_model}) * (1.0 / std::sqrt(double(d_model)))).to(device);

  // The request queue.
  std::mt19937_64 rng(seed + 1);
  std::deque<Request> queue;
  for (int i = 0; i < requests; ++i) {
    Request r{i, {}, min_new + int64_t(rng() % uint64_t(max_new - min_new + 1))};
    const int64_t plen = min_prompt + int64_t(rng() % uint64_t(max_prompt - min_prompt + 1));
    for (int64_t t = 0; t < plen; ++t) r.prompt.push_back(int64_t(rng() % uint64_t(vocab)));
    queue.push_back(std::move(r));
  }

  PagedAttention pa(n_pages, page_size, slots, device);
  Tensor k_cache = zeros({1, hkv, pa.max_cached_seq_len(), e}, TensorOptions(cache_dtype).device(device));
  Tensor v_cache = zeros_like(k_cache);
  // One logical mask for all steps: every key of a sequence up to the cache's length; the per-slot length
  // (kv_len) and the slot of each row (batch_idx) are applied when converting to the physical cache.
  BlockMask logical =
      create_block_mask(noop_mask, 1, 1, 1, pa.max_cached_seq_len(), BlockSize(128, page_size), device);
  // Token ids [n] on the device.
  auto ids = [&](const std::vector<int64_t>& t) { return from_vector(t, {int64_t(t.size())}, kInt64).to(device); };

  // K/V rows of tokens at positions [pos0, pos0 + n) of a slot.
  auto write_kv = [&](int64_t slot, const std::vector<int64_t>& tokens, int64_t pos0) {
    const int64_t n = int64_t(tokens.size());
    Tensor x = embedding(emb, ids(tokens));                                            // [n, d_model]
    Tensor k = matmul(x, wk).view({n, hkv, e}).permute({1, 0, 2}).unsqueeze(0).to(cache_dtype);  // [1, hkv, n, e]
    Tensor v = matmul(x, wv).view({n, hkv, e}).permute({1, 0, 2}).unsqueeze(0).to(cache_dtype);
    pa.reserve(slot, pos0 + n);
    pa.assign(from_vector(std::vector<int64_t>{slot}, {1}, kInt64),
              arange(double(pos0), double(pos0 + n), 1, kInt64).unsqueeze(0), k, v, k_cache, v_cache);
  };

  std::vector<std::optional<Active>> active(static_cast<size_t>(slots));
  auto admit = [&]() {
    for (int64_t s = 0; s < slots && !queue.empty(); ++s) {
      if (active[size_t(s)]) continue;
      const Request& r = queue.front();
      // Admit only when the pool can hold the whole request (prompt + budget): no preemption needed.
      const int64_t need = (int64_t(r.prompt.size()) + r.max_new + page_size - 1) / page_size;
      int64_t committed = 0;  // pages the active sequences will still take
      for (int64_t o = 0; o < slots; ++o)
        if (active[size_t(o)]) {
          const Active& a = *active[size_t(o)];
          committed += (int64_t(a.req.prompt.size()) + a.req.max_new + page_size - 1) / page_size -
                       int64_t(pa.pages_of(o).size());
        }
      if (need > int64_t(pa.empty_pages().size()) - committed) return;
      Active a{r, 0, r.prompt.back(), {}};
      write_kv(s, r.prompt, 0);
      a.len = int64_t(r.prompt.size());
      active[size_t(s)] = std::move(a);
      queue.pop_front();
      std::printf("  + request %d (prompt %zu, budget %lld) -> slot %lld\n", r.id, r.prompt.size(),
                  (long long)r.max_new, (long long)s);
    }
  };

  int64_t steps = 0, tokens_out = 0, finished = 0;
  double attn_s = 0;
  const auto t0 = std::chrono::steady_clock::now();
  admit();
  while (true) {
    std::vector<int64_t> rows;
    for (int64_t s = 0; s < slots; ++s)
      if (active[size_t(s)]) rows.push_back(s);
    if (rows.empty()) break;
    const int64_t n = int64_t(rows.size());
    // The last token's query, K and V; its K/V go into the cache first (a token attends to itself).
    std::vector<int64_t> last, lens;
    for (int64_t s : rows) last.push_back(active[size_t(s)]->last_token);
    Tensor x = embedding(emb, ids(last));  // [n, d_model]
    Tensor q = matmul(x, wq).view({n, hq, 1, e}).to(cache_dtype);
    Tensor k = matmul(x, wk).view({n, hkv, 1, e}).to(cache_dtype), v = matmul(x, wv).view({n, hkv, 1, e}).to(cache_dtype);
    std::vector<int64_t> pos;
    for (int64_t s : rows) {
      Active& a = *active[size_t(s)];
      pa.reserve(s, a.len + 1);
      pos.push_back(a.len);
      a.len += 1;
      lens.push_back(a.len);
    }
    // Slots, positions and lengths as host tensors: PagedAttention reads them on the host (no device read).
    pa.assign(from_vector(rows, {n}, kInt64), from_vector(pos, {n, 1}, kInt64), k, v, k_cache, v_cache);
    sync();
    const auto ta = std::chrono::steady_clock::now();
    Tensor slot_t = from_vector(rows, {n}, kInt64), len_t = from_vector(lens, {n}, kInt64);
    FlexAttentionOptions o;
    o.block_mask = pa.convert_logical_block_mask(logical, slot_t, len_t);
    o.enable_gqa = hq != hkv;
    Tensor attn = flex_attention(q, k_cache, v_cache, o).out;  // [n, hq, 1, e]
    sync();
    attn_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - ta).count();
    Tensor h = matmul(attn.to(kFloat32).reshape({n, d_model}), wo) + x;
    // Greedy, tied output embedding; the n chosen ids come back to the host in one copy.
    const std::vector<double> next = argmax(matmul(h, emb.t()), 1).to(kCPU).to_vector();
    for (int64_t i = 0; i < n; ++i) {
      Active& a = *active[size_t(rows[size_t(i)])];
      a.last_token = static_cast<int64_t>(next[size_t(i)]);
      a.generated.push_back(a.last_token);
    }
    tokens_out += n;
    ++steps;
    // Finished sequences give their pages back; queued requests take the free slots.
    for (int64_t s : rows) {
      Active& a = *active[size_t(s)];
      if (int64_t(a.generated.size()) < a.req.max_new) continue;
      std::printf("  - request %d done in slot %lld: %lld tokens cached, first generated:", a.req.id, (long long)s,
                  (long long)a.len);
      for (size_t t = 0; t < std::min<size_t>(6, a.generated.size()); ++t) std::printf(" %lld", (long long)a.generated[t]);
      std::printf("\n");
      pa.erase(s);
      active[size_t(s)].reset();
      ++finished;
    }
    admit();
    if (steps % print_every == 0 || (queue.empty() && finished == requests)) {
      const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      int64_t used_tokens = 0, reserved = 0, live = 0;
      for (int64_t s = 0; s < slots; ++s) {
        reserved += pa.capacity(s);
        if (active[size_t(s)]) used_tokens += active[size_t(s)]->len, ++live;
      }
      std::printf("step %4lld | active %lld/%lld | queued %zu | %7.1f tok/s | pages in use %lld/%lld (%.0f%%) | "
                  "reserved tokens filled %.0f%%\n",
                  (long long)steps, (long long)live, (long long)slots, queue.size(), double(tokens_out) / el,
                  (long long)pa.pages_in_use(), (long long)n_pages, 100.0 * double(pa.pages_in_use()) / double(n_pages),
                  reserved ? 100.0 * double(used_tokens) / double(reserved) : 0.0);
      // Page table occupancy: one character per logical page slot ('#' mapped, '.' none), first 64 columns.
      // A slot's pages fill its logical pages from 0 on, so its host page list says which are mapped.
      for (int64_t s = 0; s < slots; ++s) {
        std::printf("    slot %2lld |", (long long)s);
        const int64_t cols = std::min<int64_t>(64, n_pages), mapped = int64_t(pa.pages_of(s).size());
        for (int64_t c = 0; c < cols; ++c) std::printf("%c", c < mapped ? '#' : '.');
        std::printf("| %lld pages\n", (long long)mapped);
      }
    }
  }
  const double el = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("served %lld requests: %lld steps, %lld tokens in %.2f s = %.1f tok/s, %.1f steps/s (attention %.2f s); "
              "pages in use at the end %lld/%lld; %s, %s cache\n",
              (long long)finished, (long long)steps, (long long)tokens_out, el, double(tokens_out) / el,
              double(steps) / el, attn_s, (long long)pa.pages_in_use(), (long long)n_pages, device_name.c_str(),
              dtype_name == "bf16" ? "bfloat16" : "float32");
  if (finished != requests) {
    std::fprintf(stderr, "paged_decode: %lld of %lld requests were not served: the pool never had room for them\n",
                 (long long)(requests - finished), (long long)requests);
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "paged_decode: error: %s\n", e.what());
  return 1;
}
