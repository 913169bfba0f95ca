// gradcheck of flex_attention's fused kernels in float64 for a chosen builtin score/mask mod and shape:
//   gradcheck_attention --score-mod alibi --mask causal -B 1 -H 2 -L 16 -E 4 [--learnable-bias]
// prints the worst element (input, index, numeric vs analytic) and exits 1 on failure.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <limits>
#include <map>

#include "flexgrad/attention/flex_attention.h"
#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/ops/ops.h"
#include "examples/cli_checks.h"

using namespace fg;

int main(int argc, char** argv) {
  CLI::App app{"gradcheck flex_attention (float64 central differences vs the fused backward)"};
  std::string score = "alibi", mask = "causal";
  int64_t B = 1, H = 2, Hkv = 0, L = 16, Lkv = 0, E = 4, block = 8;
  bool learnable = false;
  uint64_t seed = 0;
  const std::vector<std::string> scores{"identity", "times_two", "squared", "rel_bias", "alibi", "softcap"};
  const std::vector<std::string> masks{"none", "causal", "sliding4", "prefix4", "document"};
  app.add_option("--score-mod", score, "identity|times_two|squared|rel_bias|alibi|softcap")->check(CLI::IsMember(scores));
  app.add_option("--mask", mask, "none|causal|sliding4|prefix4|document")->check(CLI::IsMember(masks));
  app.add_option("-B", B, "batch")->check(cli::at_least(1));
  app.add_option("-H", H, "query heads")->check(cli::at_least(1));
  app.add_option("--hkv", Hkv, "kv heads (GQA when < H; default H)")->check(cli::at_least(0));
  app.add_option("-L", L, "query length")->check(cli::at_least(1));
  app.add_option("--lkv", Lkv, "kv length (default L)")->check(cli::at_least(0));
  app.add_option("-E", E, "head dim")->check(cli::at_least(1));
  app.add_option("--block", block, "BlockMask block size")->check(cli::at_least(1));
  app.add_flag("--learnable-bias", learnable, "add a learnable per-head bias captured by the score_mod");
  app.add_option("--seed", seed);
  CLI11_PARSE(app, argc, argv);
  if (Hkv == 0) Hkv = H;
  if (Lkv == 0) Lkv = L;
  if (H % Hkv != 0) {
    std::fprintf(stderr, "gradcheck_attention: --hkv %ld must divide -H %ld\n", Hkv, H);
    return 2;
  }
  try {
    Generator gen(seed);
    Tensor q = randn({B, H, L, E}, kFloat64, &gen).requires_grad_(), k = randn({B, Hkv, Lkv, E}, kFloat64, &gen).requires_grad_();
    Tensor v = randn({B, Hkv, Lkv, E}, kFloat64, &gen).requires_grad_();
    Tensor bias = (randn({H}, kFloat64, &gen) * 0.1).requires_grad_(learnable);
    std::map<std::string, ScoreMod> score_mods{
        {"identity", [](Expr s, Expr, Expr, Expr, Expr) { return s; }},
        {"times_two", [](Expr s, Expr, Expr, Expr, Expr) { return s * 2; }},
        {"squared", [](Expr s, Expr, Expr, Expr, Expr) { return s * s; }},
        {"rel_bias", [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }},
        {"alibi", [H](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + (kv - q) * exp2(-((h + 1) * 8.0 / H)); }},
        {"softcap", [](Expr s, Expr, Expr, Expr, Expr) { return 20.0 * tanh(s / 20.0); }}};
    ScoreMod base = score_mods.at(score);
    FlexAttentionOptions o;
    o.enable_gqa = Hkv != H;
    o.kernel.backend = FlexBackend::Fused;
    o.score_mod = learnable ? ScoreMod([base, b = Captured(bias)](Expr s, Expr bb, Expr h, Expr q, Expr kv) {
      return base(s, bb, h, q, kv) + b[h];
    }) : base;
    std::map<std::string, MaskMod> mask_mods{
        {"causal", [](Expr, Expr, Expr q, Expr kv) { return q >= kv; }},
        {"sliding4", [](Expr, Expr, Expr q, Expr kv) { return (q >= kv) & (q - kv <= 4); }},
        {"prefix4", or_masks(MaskMod([](Expr, Expr, Expr q, Expr kv) { return q >= kv; }),
                             MaskMod([](Expr, Expr, Expr, Expr kv) { return kv < 4; }))},
        {"document", [](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 5) == floor_div(kv, 5); }}};
    if (mask != "none") o.block_mask = create_block_mask(mask_mods.at(mask), std::nullopt, std::nullopt, L, Lkv, block);
    TensorList inputs{q, k, v};
    if (learnable) inputs.push_back(bias);
    auto result = gradcheck([&](const TensorList&) { return TensorList{flex_attention(q, k, v, o).out}; }, inputs);
    std::printf("flex_attention gradcheck: score_mod=%s mask=%s B=%ld H=%ld Hkv=%ld L=%ld Lkv=%ld E=%ld\n%s\n", score.c_str(),
                mask.c_str(), B, H, Hkv, L, Lkv, E, result.report().c_str());
    return result.ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gradcheck_attention: %s\n", e.what());
    return 2;
  }
}
