// The mask and score-mod gallery (attention/gallery/) from the command line: any constructor by name with
// any parameters, its traced mask_mod, its BlockMask picture and sparsity, and optionally an SVG of the
// BlockMask beside the dense mask. Without a name, a tour of every gallery mask sized to --seq.
//
//   mask_gallery --list                                       the constructors and their parameters
//   mask_gallery natten canvas_w=32 canvas_h=32 kernel_w=7 kernel_h=7 --svg natten.svg
//   mask_gallery document offsets=0,100,260,300,512 inner=sliding_window inner.window=48 --seq 512
//   mask_gallery sandwich heads=4 max_seq_len=256 d_bar=128 mask=causal --seq 256
//   mask_gallery --seq 1024 --block 128                       the tour
//
// Parameter values: integers and numbers as written; int tensors as comma lists (offsets=0,37,200); bool
// tensors as the comma list of their true positions, --seq long (is_global=0,1,256); any tensor from a file
// with @path.npy (adjacency=@adj.npy); an inner mask by name (inner=causal) with its own parameters as
// inner.NAME=VALUE. In the pictures, one character pair per (group of) block(s):
//   █ full (visited, mask not evaluated)   ▓ partial (visited, mask evaluated per entry)
//   ░ a downsampled cell mixing visited and skipped blocks      (blank) skipped
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <map>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/gallery/registry.h"
#include "examples/cli_checks.h"
#include "examples/mask_svg.h"
#include "flexgrad/tensor/npy.h"

using namespace fg;

namespace {

int64_t parse_int(const std::string& key, const std::string& v) {
  size_t used = 0;
  int64_t x = 0;
  try {
    x = std::stoll(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  FG_CHECK(used == v.size() && !v.empty(), ValueError, "{}={}: expected an integer", key, v);
  return x;
}

double parse_number(const std::string& key, const std::string& v) {
  size_t used = 0;
  double x = 0;
  try {
    x = std::stod(v, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  FG_CHECK(used == v.size() && !v.empty(), ValueError, "{}={}: expected a number", key, v);
  return x;
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (size_t i = 0; i <= s.size(); ++i)
    if (i == s.size() || s[i] == sep) {
      parts.push_back(s.substr(start, i - start));
      start = i + 1;
    }
  return parts;
}

// key=value tokens (keys with a "prefix." belong to the inner mask named by the value of `prefix`) as a spec.
GallerySpec spec_from_tokens(const std::string& name, const std::map<std::string, std::string>& kv, int64_t seq,
                             const std::string& prefix = "") {
  GallerySpec spec;
  const GalleryEntry* entry = find_gallery_entry(name);
  FG_CHECK(entry, ValueError, "no gallery constructor '{}' (mask_gallery --list shows them)", name);
  (entry->is_score ? spec.score : spec.mask) = name;
  std::vector<const GalleryEntry*> entries{entry};
  if (prefix.empty()) {
    for (const char* other : {"mask", "score"}) {
      auto it = kv.find(other);
      if (it == kv.end()) continue;
      const GalleryEntry* e = find_gallery_entry(it->second);
      FG_CHECK(e && e->is_score == (std::string(other) == "score"), ValueError, "{}={}: not a gallery {}", other,
               it->second, other);
      FG_CHECK((e->is_score ? spec.score : spec.mask).empty(), ValueError, "{}={}: {} is already a {}", other,
               it->second, name, other);
      (e->is_score ? spec.score : spec.mask) = it->second;
      entries.push_back(e);
    }
  }
  for (const auto& [full_key, value] : kv) {
    if (full_key.rfind(prefix, 0) != 0) continue;
    const std::string key = full_key.substr(prefix.size());
    if (key.find('.') != std::string::npos || (prefix.empty() && (key == "mask" || key == "score"))) continue;
    const GalleryParam* param = nullptr;
    for (const GalleryEntry* e : entries)
      for (const auto& p : e->params)
        if (p.name == key) param = &p;
    FG_CHECK(param, ValueError, "{}: {} has no parameter '{}'", full_key, describe_gallery_spec(spec), key);
    if (value.rfind('@', 0) == 0 && param->kind != GalleryParamKind::Mask) {
      spec.args[key] = load_npy(value.substr(1));
      continue;
    }
    switch (param->kind) {
      case GalleryParamKind::Int: spec.args[key] = parse_int(full_key, value); break;
      case GalleryParamKind::Float: spec.args[key] = parse_number(full_key, value); break;
      case GalleryParamKind::IntTensor: {
        std::vector<int64_t> xs;
        for (const auto& p : split(value, ',')) xs.push_back(parse_int(full_key, p));
        spec.args[key] = from_vector(xs, {static_cast<int64_t>(xs.size())}, kInt64);
        break;
      }
      case GalleryParamKind::BoolTensor: {
        Tensor t = zeros({seq}, kBool);
        for (const auto& p : split(value, ',')) {
          const int64_t i = parse_int(full_key, p);
          FG_CHECK(i >= 0 && i < seq, ValueError, "{}: position {} is outside --seq {}", full_key, i, seq);
          t.set_at({i}, 1);
        }
        spec.args[key] = t;
        break;
      }
      case GalleryParamKind::FloatTensor: {
        std::vector<float> xs;
        for (const auto& p : split(value, ',')) xs.push_back(static_cast<float>(parse_number(full_key, p)));
        spec.args[key] = from_vector(xs, {static_cast<int64_t>(xs.size())}, kFloat32);
        break;
      }
      case GalleryParamKind::Mask:
        spec.args[key] = std::make_shared<const GallerySpec>(spec_from_tokens(value, kv, seq, full_key + "."));
        break;
    }
  }
  return spec;
}

void show(const GallerySpec& spec, int64_t seq, int64_t block, const std::string& svg_path) {
  GalleryMods mods = build_gallery_mods(spec);
  fmt::print("== {} ==\n", mods.description);
  if (mods.score_mod) fmt::print("score_mod: {}\n", trace_score_mod(mods.score_mod).to_string());
  for (const auto& [name, t] : mods.tables)
    fmt::print("table {}: {} {}\n", name, dtype_name(t.dtype()), shape_str(t.sizes()));
  BlockMask bm = create_block_mask(mods.mask_mod ? mods.mask_mod : MaskMod(noop_mask), std::nullopt, std::nullopt, seq,
                                   seq, block);
  const std::vector<uint8_t> dense = examples::dense_mask(bm);
  int64_t allowed = 0;
  for (uint8_t x : dense) allowed += x;
  fmt::print("mask_mod: {}\nsparsity: {:.2f}% of the score matrix skipped (BlockMask, BLOCK_SIZE {}); {:.2f}% of the "
             "entries masked\n",
             mods.mask_mod ? bm.mask_program()->to_string() : std::string("none (noop_mask)"), bm.sparsity(), block,
             100.0 * (1.0 - static_cast<double>(allowed) / static_cast<double>(seq * seq)));
  // Drop PyTorch's "(b, h)" header line: the picture is of (0, 0).
  std::string pic = bm.to_string({32, 32}, 1, /*show_partial=*/true);
  fmt::print("{}\n", pic.substr(pic.find('\n') + 1));
  if (!svg_path.empty()) {
    std::ofstream f(svg_path);
    FG_CHECK(f.good(), IOError, "--svg: cannot write {}", svg_path);
    f << examples::mask_svg(bm, dense, mods.description,
                            fmt::format("Q_LEN = KV_LEN = {}, BLOCK_SIZE {}: {:.2f}% of the score matrix skipped", seq,
                                        block, bm.sparsity()));
    FG_CHECK(f.good(), IOError, "--svg: writing {} failed", svg_path);
    fmt::print("wrote {}\n", svg_path);
  }
}

// Every gallery mask with parameters sized to seq (the ones a size does not suit are said and skipped).
std::vector<std::pair<std::string, std::map<std::string, std::string>>> tour(int64_t seq) {
  auto s = [](int64_t x) { return std::to_string(std::max<int64_t>(1, x)); };
  std::vector<std::pair<std::string, std::map<std::string, std::string>>> t = {
      {"causal", {}},
      {"prefix_lm", {{"prefix_length", s(seq / 4)}}},
      {"sliding_window", {{"window", s(seq / 4)}}},
      {"dilated_sliding_window", {{"window", s(seq / 8)}, {"dilation", "4"}}},
      {"global_sliding_window", {{"window", s(seq / 16)}, {"is_global", fmt::format("0,1,{},{}", seq / 2, seq / 2 + 1)}}},
      {"batchify", {{"n", s(seq / 4)}, {"inner", "causal"}}},
  };
  // Four documents, document k about (k + 1) times as long as the first.
  std::vector<std::string> offsets{"0"};
  for (int64_t k = 1; k <= 4; ++k) offsets.push_back(std::to_string(seq * k * (k + 1) / 20));
  const std::string off = fmt::format("{}", fmt::join(offsets, ","));
  t.push_back({"document", {{"offsets", off}, {"inner", "sliding_window"}, {"inner.window", s(seq / 16)}}});
  t.push_back({"packed_causal_document", {{"offsets", off}}});
  // Two prompts of seq/8, each with three continuations of seq/8.
  if (seq % 8 == 0) {
    std::vector<std::string> o;
    for (int64_t k = 0; k <= 8; ++k) o.push_back(std::to_string(k * seq / 8));
    t.push_back({"shared_prefix", {{"offsets", fmt::format("{}", fmt::join(o, ","))}, {"prefix_document_id", "0,0,0,0,4,4,4,4"}}});
  }
  if (seq % 2 == 0) t.push_back({"block_diffusion", {{"seq_len", s(seq / 2)}, {"block_size", s(seq / 16)}}});
  const auto side = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(seq))));
  if (side * side == seq && side >= 7) {
    std::map<std::string, std::string> n{{"canvas_w", s(side)}, {"canvas_h", s(side)}, {"kernel_w", "7"}, {"kernel_h", "7"}};
    t.push_back({"natten", n});
    if (side % 8 == 0) {
      auto tn = n;
      tn["tile_w"] = tn["tile_h"] = "8";
      t.push_back({"tiled_natten", tn});
    }
    if ((side & (side - 1)) == 0) t.push_back({"morton_natten", n});
  }
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Print any mask or score mod of the gallery (attention/gallery) with its BlockMask and sparsity"};
  int64_t seq = 1024, block = 128;
  std::string svg;
  bool list = false;
  std::vector<std::string> words;
  app.add_option("spec", words, "NAME [key=value ...]: a gallery constructor and its parameters (none: the tour)");
  app.add_option("-s,--seq", seq, "sequence length (Q_LEN = KV_LEN)")->check(cli::at_least(1));
  app.add_option("-b,--block", block, "BLOCK_SIZE (square)")->check(cli::at_least(1));
  app.add_option("--svg", svg, "write an SVG picture of the BlockMask and the dense mask (one mask only)");
  app.add_flag("--list", list, "list the constructors and their parameters");
  CLI11_PARSE(app, argc, argv);

  try {
    if (list) {
      for (const GalleryEntry& e : gallery_entries()) {
        fmt::print("{} ({}): {}\n", e.name, e.is_score ? "score_mod" : "mask_mod", e.summary);
        for (const GalleryParam& p : e.params)
          fmt::print("    {}: {}, {}\n", p.name, gallery_param_kind_name(p.kind), p.help);
      }
      return 0;
    }
    if (words.empty()) {
      FG_CHECK(svg.empty(), ValueError, "--svg: name one mask (the tour prints {} of them)", tour(seq).size());
      fmt::print("Sequence {} x {}, BLOCK_SIZE {}: {} x {} blocks.\n\n", seq, seq, block, (seq + block - 1) / block,
                 (seq + block - 1) / block);
      for (const auto& [name, kv] : tour(seq)) show(spec_from_tokens(name, kv, seq), seq, block, "");
      return 0;
    }
    std::map<std::string, std::string> kv;
    for (size_t i = 1; i < words.size(); ++i) {
      const size_t eq = words[i].find('=');
      FG_CHECK(eq != std::string::npos && eq > 0, ValueError, "'{}': parameters are key=value", words[i]);
      FG_CHECK(kv.emplace(words[i].substr(0, eq), words[i].substr(eq + 1)).second, ValueError, "'{}': {} given twice",
               words[i], words[i].substr(0, eq));
    }
    show(spec_from_tokens(words[0], kv, seq), seq, block, svg);
  } catch (const std::exception& e) {  // flexgrad errors, and bad_alloc for absurd sizes
    fmt::print(stderr, "error: {}\n", e.what());
    return 1;
  }
  return 0;
}
