// Neighbourhood attention (NATTEN) over a 2-D canvas flattened to one sequence: each query sees the
// kernel_w x kernel_h window centred on it, the centre clamped so the window stays inside the canvas.
// Three flattenings of the canvas (which decide how many blocks a window touches, hence the sparsity):
// row-major, static tiles, and the Morton (Z-order) curve.
//
// All three: for an index mapped to (x, y), cx = clamp(q_x, kernel_w // 2, canvas_w - 1 - kernel_w // 2),
// cy = clamp(q_y, kernel_h // 2, canvas_h - 1 - kernel_h // 2), and the mask is
// |cx - kv_x| <= kernel_w // 2 and |cy - kv_y| <= kernel_h // 2.
// Source: Hassani, Walton, Li, Li, Shi, "Neighborhood Attention Transformer", CVPR 2023
// (https://github.com/SHI-Labs/NATTEN); the three flattenings as attention-gym attn_gym/masks/natten.py.
// ValueError when a size is < 1 or a kernel is larger than the canvas.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

struct NattenShape {
  int64_t canvas_w = 0, canvas_h = 0, kernel_w = 0, kernel_h = 0;
};

// Row-major: index i -> (x, y) = (i // canvas_w, i % canvas_w).
MaskMod natten_mask(NattenShape s);

// Static tile_w x tile_h tiles in tile-major order: t = i // (tile_h tile_w), o = i % (tile_h tile_w),
// x = (t % (canvas_w // tile_w)) tile_w + o % tile_w, y = (t // (canvas_w // tile_w)) tile_h + o // tile_w.
// ValueError unless the tiles divide the canvas.
MaskMod tiled_natten_mask(NattenShape s, int64_t tile_w, int64_t tile_h);

// Morton (Z-order) index: x = the even bits of i compacted, y = the odd bits (16 bits each, i < 2^32).
// Source of the ordering: G. M. Morton, "A computer oriented geodetic data base and a new technique in file
// sequencing", IBM 1966.
MaskMod morton_natten_mask(NattenShape s);

// The Morton decoding as an expression: the bits of i at positions first_bit, first_bit + 2, ... (16 of
// them) compacted; (morton_compact(i, 0), morton_compact(i, 1)) is (x, y). Built from // and %, which the IR
// has (it has no bit operations).
Expr morton_compact(const Expr& i, int first_bit);

}  // namespace fg
