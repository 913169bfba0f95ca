// A guided tour of FlexAttention masks: each mask_mod is an ordinary C++ lambda over fg::Expr, traced
// once into a small program; create_block_mask evaluates it block by block and keeps only the blocks
// attention must visit. The pictures show one character pair per (group of) block(s):
//   █ full (visited, mask not evaluated)   ▓ partial (visited, mask evaluated per entry)
//   ░ a downsampled cell mixing visited and skipped blocks      (blank) skipped
//
//   mask_gallery --seq 1024 --block 128
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "flexgrad/attention/block_mask.h"
#include "examples/cli_checks.h"

using namespace fg;

namespace {

void show(const std::string& title, const std::string& why, const MaskMod& mask, int64_t seq, int64_t block) {
  BlockMask bm = create_block_mask(mask, std::nullopt, std::nullopt, seq, seq, block);
  fmt::print("== {} ==\n{}\nmask_mod: {}\nsparsity: {:.2f}% of the score matrix skipped\n", title, why,
             bm.mask_program()->to_string(), bm.sparsity());
  // Drop PyTorch's "(b, h)" header line: these masks do not depend on b or h.
  std::string pic = bm.to_string({32, 32}, 1, /*show_partial=*/true);
  fmt::print("{}\n", pic.substr(pic.find('\n') + 1));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Print the block masks of common attention patterns"};
  int64_t seq = 1024, block = 128, window = 256, prefix = 256, chunk = 256, dilation = 2;
  int64_t docs = 4;
  app.add_option("-s,--seq", seq, "sequence length (Q_LEN = KV_LEN)")->check(cli::at_least(1));
  app.add_option("-b,--block", block, "BLOCK_SIZE (square)")->check(cli::at_least(1));
  app.add_option("--window", window, "sliding window size")->check(cli::at_least(1));
  app.add_option("--prefix", prefix, "prefix length of the prefix-LM mask")->check(cli::at_least(0));
  app.add_option("--chunk", chunk, "chunk length of the chunked mask")->check(cli::at_least(1));
  app.add_option("--dilation", dilation, "dilation of the dilated mask")->check(cli::at_least(1));
  app.add_option("--docs", docs, "number of documents packed into the sequence")->check(cli::at_least(1));
  CLI11_PARSE(app, argc, argv);

  try {
    const MaskMod causal = [](Expr, Expr, Expr q, Expr kv) { return q >= kv; };
    const MaskMod sliding = [window](Expr, Expr, Expr q, Expr kv) { return q - kv < window; };
    const MaskMod prefix_mod = [prefix](Expr, Expr, Expr, Expr kv) { return kv < prefix; };
    const MaskMod same_chunk = [chunk](Expr, Expr, Expr q, Expr kv) { return floor_div(q, chunk) == floor_div(kv, chunk); };
    const MaskMod dilated = [dilation](Expr, Expr, Expr q, Expr kv) { return (q - kv) % dilation == 0; };
    // Document ids of `docs` packed documents, document k about (k+1) times as long as the first;
    // captured as a tensor and read with [] inside the mask.
    std::vector<int64_t> ids(static_cast<size_t>(seq));
    const int64_t weight = docs * (docs + 1) / 2;
    for (int64_t i = 0, k = 0; i < seq; ++i) {
      while (k < docs - 1 && i * weight >= seq * (k + 1) * (k + 2) / 2) ++k;
      ids[i] = k;
    }
    Captured doc(from_vector(ids, {seq}, kInt64), "doc");
    const MaskMod same_doc = [doc](Expr, Expr, Expr q, Expr kv) { return doc[q] == doc[kv]; };

    fmt::print("Sequence {} x {}, BLOCK_SIZE {}: {} x {} blocks.\n\n", seq, seq, block, (seq + block - 1) / block,
               (seq + block - 1) / block);
    show("causal", "Each token attends to itself and the past. Blocks on the diagonal are partial.", causal, seq, block);
    show("sliding window", fmt::format("Causal, and at most {} tokens back (and_masks(causal, window)).", window),
         and_masks(causal, sliding), seq, block);
    show("prefix LM", fmt::format("Bidirectional over the first {} tokens, causal after (or_masks).", prefix),
         or_masks(causal, prefix_mod), seq, block);
    show("document (packed sequences)",
         fmt::format("{} documents packed in one sequence; causal within each (doc ids captured).", docs),
         and_masks(causal, same_doc), seq, block);
    show("dilated", fmt::format("Causal, tokens at distances multiple of {}: no block is empty or full, so every visited block is "
                                "partial and sparsity comes only from causality.", dilation),
         and_masks(causal, dilated), seq, block);
    show("chunked", fmt::format("Bidirectional within chunks of {} tokens.", chunk), same_chunk, seq, block);
    show("chunked causal + sliding window", "and_masks of three masks: the intersection of the patterns.",
         and_masks(causal, same_chunk, sliding), seq, block);
    show("not causal", "not_mask(causal): the strict upper triangle; full and empty swap, partial stays partial.",
         not_mask(causal), seq, block);
  } catch (const std::exception& e) {  // flexgrad errors, and bad_alloc for absurd sizes
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
