// NATTEN masks (see natten.h).
#include "flexgrad/attention/gallery/natten.h"

#include <utility>

namespace fg {

namespace {

void check_shape(const NattenShape& s, const char* who) {
  FG_CHECK(s.canvas_w >= 1 && s.canvas_h >= 1, ValueError, "{}: canvas_w and canvas_h must be >= 1, got {} x {}", who,
           s.canvas_w, s.canvas_h);
  FG_CHECK(s.kernel_w >= 1 && s.kernel_w <= s.canvas_w, ValueError, "{}: kernel_w must be in [1, canvas_w = {}], got {}",
           who, s.canvas_w, s.kernel_w);
  FG_CHECK(s.kernel_h >= 1 && s.kernel_h <= s.canvas_h, ValueError, "{}: kernel_h must be in [1, canvas_h = {}], got {}",
           who, s.canvas_h, s.kernel_h);
}

// The neighbourhood test shared by the three flattenings, given each index's (x, y).
Expr in_window(const NattenShape& s, const std::pair<Expr, Expr>& q, const std::pair<Expr, Expr>& kv) {
  const int64_t rw = s.kernel_w / 2, rh = s.kernel_h / 2;
  Expr cx = clamp(q.first, rw, s.canvas_w - 1 - rw);
  Expr cy = clamp(q.second, rh, s.canvas_h - 1 - rh);
  return (abs(cx - kv.first) <= rw) & (abs(cy - kv.second) <= rh);
}

}  // namespace

MaskMod natten_mask(NattenShape s) {
  check_shape(s, "natten_mask");
  return [s](Expr, Expr, Expr q, Expr kv) {
    auto xy = [&](const Expr& i) { return std::pair<Expr, Expr>{floor_div(i, s.canvas_w), i % s.canvas_w}; };
    return in_window(s, xy(q), xy(kv));
  };
}

MaskMod tiled_natten_mask(NattenShape s, int64_t tile_w, int64_t tile_h) {
  check_shape(s, "tiled_natten_mask");
  FG_CHECK(tile_w >= 1 && tile_h >= 1, ValueError, "tiled_natten_mask: tile_w and tile_h must be >= 1, got {} x {}",
           tile_w, tile_h);
  FG_CHECK(s.canvas_w % tile_w == 0 && s.canvas_h % tile_h == 0, ValueError,
           "tiled_natten_mask: tiles {} x {} must divide the canvas {} x {}", tile_w, tile_h, s.canvas_w, s.canvas_h);
  return [s, tile_w, tile_h](Expr, Expr, Expr q, Expr kv) {
    const int64_t area = tile_w * tile_h, tiles_per_row = s.canvas_w / tile_w;
    auto xy = [&](const Expr& i) {
      Expr t = floor_div(i, area), o = i % area;
      return std::pair<Expr, Expr>{(t % tiles_per_row) * tile_w + o % tile_w,
                                   floor_div(t, tiles_per_row) * tile_h + floor_div(o, tile_w)};
    };
    return in_window(s, xy(q), xy(kv));
  };
}

Expr morton_compact(const Expr& i, int first_bit) {
  FG_CHECK(first_bit == 0 || first_bit == 1, ValueError, "morton_compact: first_bit must be 0 or 1, got {}", first_bit);
  Expr r = 0;
  for (int k = 0; k < 16; ++k) {
    const int64_t bit = int64_t{1} << (2 * k + first_bit);
    r = r + (floor_div(i, bit) % 2) * (int64_t{1} << k);
  }
  return r;
}

MaskMod morton_natten_mask(NattenShape s) {
  check_shape(s, "morton_natten_mask");
  return [s](Expr, Expr, Expr q, Expr kv) {
    auto xy = [](const Expr& i) { return std::pair<Expr, Expr>{morton_compact(i, 0), morton_compact(i, 1)}; };
    return in_window(s, xy(q), xy(kv));
  };
}

}  // namespace fg
