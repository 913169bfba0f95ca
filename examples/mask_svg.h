// An SVG picture of a mask: its BlockMask (one square per block: full, partial or skipped) beside the dense
// mask (the entries attention is allowed at) with the block grid over it. Plain SVG text, no dependency:
// any browser shows it.
#pragma once
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "flexgrad/attention/block_mask.h"
#include "flexgrad/attention/tile_eval.h"
#include "examples/xml_escape.h"

namespace fg::examples {

// The dense [Q_LEN, KV_LEN] mask of (b, h), row-major, 1 where allowed: the BlockMask's traced mask_mod
// evaluated on the CPU in bands of rows by the evaluator the fused CPU kernels use.
inline std::vector<uint8_t> dense_mask(const BlockMask& bm, int64_t b = 0, int64_t h = 0) {
  const auto [Lq, Lkv] = bm.seq_lengths();
  std::vector<uint8_t> out(static_cast<size_t>(Lq * Lkv));
  TileEvaluator<float> ev(*bm.mask_program());
  for (int64_t q0 = 0; q0 < Lq; q0 += 64)
    ev.mask_tile(b, h, q0, std::min<int64_t>(64, Lq - q0), 0, Lkv, out.data() + q0 * Lkv, Lkv);
  return out;
}

// The picture of (b, h) = (0, 0). `dense` is dense_mask(bm); title and subtitle head the picture. Dense masks
// longer than 1024 per side are drawn in cells of several entries, filled where any entry is allowed.
inline std::string mask_svg(const BlockMask& bm, const std::vector<uint8_t>& dense, const std::string& title,
                            const std::string& subtitle) {
  const auto [Lq, Lkv] = bm.seq_lengths();
  const int64_t nq = bm.num_q_blocks(), nkv = bm.num_kv_blocks();
  const double panel = 480, gap = 40, top = 76, left = 20;
  const double scale = panel / static_cast<double>(std::max(Lq, Lkv));  // px per entry, both panels
  const double bw = panel / static_cast<double>(std::max(nq, nkv));     // px per block on the left
  const double width = left * 2 + panel * 2 + gap, height = top + panel + 60;
  std::string s = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{0}\" height=\"{1}\" viewBox=\"0 0 {0} {1}\" "
      "font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
      "<text x=\"{2}\" y=\"24\" font-size=\"18\" font-weight=\"bold\">{3}</text>\n"
      "<text x=\"{2}\" y=\"46\" font-size=\"13\">{4}</text>\n",
      width, height, left, xml_escape(title), xml_escape(subtitle));
  // Left: blocks. Kinds: 0 empty, 1 partial, 2 full.
  const std::vector<double> kinds = bm.block_kinds().select(0, 0).select(0, 0).cpu().to_vector();
  s += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"13\">BlockMask: {} x {} blocks of {} x {}</text>\n", left,
                   top - 8, nq, nkv, bm.block_size().q, bm.block_size().kv);
  s += fmt::format("<g transform=\"translate({},{})\">\n", left, top);
  s += fmt::format("<rect width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n", bw * static_cast<double>(nkv),
                   bw * static_cast<double>(nq));
  for (int64_t i = 0; i < nq; ++i)
    for (int64_t j = 0; j < nkv; ++j) {
      const int kind = static_cast<int>(kinds[static_cast<size_t>(i * nkv + j)]);
      if (kind == 0) continue;
      s += fmt::format("<rect x=\"{:.3f}\" y=\"{:.3f}\" width=\"{:.3f}\" height=\"{:.3f}\" fill=\"{}\" stroke=\"white\" "
                       "stroke-width=\"{:.2f}\"/>\n",
                       bw * static_cast<double>(j), bw * static_cast<double>(i), bw, bw, kind == 2 ? "#1f4e79" : "#7fb3e0",
                       std::min(1.0, bw / 16));
    }
  s += "</g>\n";
  // Right: the dense mask as horizontal runs, one path.
  const int64_t cell = std::max<int64_t>(1, (std::max(Lq, Lkv) + 1023) / 1024);  // entries per drawn cell
  const double x0 = left + panel + gap;
  s += fmt::format("<text x=\"{}\" y=\"{}\" font-size=\"13\">dense mask: {} x {}{}</text>\n", x0, top - 8, Lq, Lkv,
                   cell > 1 ? fmt::format(" (cells of {} x {})", cell, cell) : std::string());
  s += fmt::format("<g transform=\"translate({},{})\">\n", x0, top);
  s += fmt::format("<rect width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#999\"/>\n",
                   scale * static_cast<double>(Lkv), scale * static_cast<double>(Lq));
  std::string path;
  const int64_t rows = (Lq + cell - 1) / cell, cols = (Lkv + cell - 1) / cell;
  std::vector<uint8_t> on(static_cast<size_t>(cols));
  const double c = scale * static_cast<double>(cell);
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(on.begin(), on.end(), 0);
    for (int64_t q = r * cell; q < std::min(Lq, (r + 1) * cell); ++q)
      for (int64_t kv = 0; kv < Lkv; ++kv)
        if (dense[static_cast<size_t>(q * Lkv + kv)]) on[static_cast<size_t>(kv / cell)] = 1;
    for (int64_t j = 0; j < cols;) {
      if (!on[static_cast<size_t>(j)]) { ++j; continue; }
      int64_t k = j;
      while (k < cols && on[static_cast<size_t>(k)]) ++k;
      path += fmt::format("M{:.3f} {:.3f}h{:.3f}v{:.3f}h{:.3f}z", c * static_cast<double>(j), c * static_cast<double>(r),
                          c * static_cast<double>(k - j), c, -c * static_cast<double>(k - j));
      j = k;
    }
  }
  s += fmt::format("<path d=\"{}\" fill=\"#1f4e79\"/>\n", path);
  // The block grid over the dense mask: which entries each block covers.
  for (int64_t i = 1; i < nq; ++i) {
    const double y = scale * static_cast<double>(i * bm.block_size().q);
    if (y < scale * static_cast<double>(Lq))
      s += fmt::format("<line x1=\"0\" y1=\"{0:.3f}\" x2=\"{1:.3f}\" y2=\"{0:.3f}\" stroke=\"#e06666\" stroke-width=\"0.7\"/>\n",
                       y, scale * static_cast<double>(Lkv));
  }
  for (int64_t j = 1; j < nkv; ++j) {
    const double x = scale * static_cast<double>(j * bm.block_size().kv);
    if (x < scale * static_cast<double>(Lkv))
      s += fmt::format("<line x1=\"{0:.3f}\" y1=\"0\" x2=\"{0:.3f}\" y2=\"{1:.3f}\" stroke=\"#e06666\" stroke-width=\"0.7\"/>\n",
                       x, scale * static_cast<double>(Lq));
  }
  s += "</g>\n";
  // Legend.
  const double ly = top + panel + 28;
  s += fmt::format(
      "<rect x=\"{0}\" y=\"{1}\" width=\"14\" height=\"14\" fill=\"#1f4e79\"/><text x=\"{2}\" y=\"{3}\" font-size=\"13\">full "
      "block (mask not evaluated) / allowed entry</text>\n"
      "<rect x=\"{4}\" y=\"{1}\" width=\"14\" height=\"14\" fill=\"#7fb3e0\"/><text x=\"{5}\" y=\"{3}\" font-size=\"13\">partial "
      "block (mask evaluated)</text>\n"
      "<line x1=\"{6}\" y1=\"{7}\" x2=\"{8}\" y2=\"{7}\" stroke=\"#e06666\"/><text x=\"{9}\" y=\"{3}\" font-size=\"13\">block "
      "boundaries</text>\n",
      left, ly, left + 20, ly + 12, left + 400, left + 420, left + 640, ly + 7, left + 660, left + 666);
  s += "</svg>\n";
  return s;
}

}  // namespace fg::examples
