// Graphormer's spatial encoding: a learnable bias per head and shortest-path distance between two nodes.
#pragma once
#include <cstdint>

#include "flexgrad/attention/expr.h"

namespace fg {

// All-pairs shortest path lengths of the unweighted graphs `adjacency` (bool or integer [B, N, N], entry
// [b, i, j] != 0 an edge i -> j) by Floyd-Warshall: int32 [B, N, N] on adjacency's device, diagonal 0,
// unreachable pairs max(N, max_distance + 1), then every length clamped to max_distance + 1.
// ShapeError unless adjacency is [B, N, N]; DTypeError for a float adjacency; ValueError when max_distance < 0.
Tensor shortest_path_distances(const Tensor& adjacency, int64_t max_distance);

// The Graphormer score_mod with the distance table it built; callable as a ScoreMod.
struct GraphormerSpatialBias {
  ScoreMod score_mod;
  Tensor table;     // as given: float [H, >= max_distance + 2], usually requires grad (learned)
  Tensor distance;  // built: shortest_path_distances(adjacency, max_distance)
  Expr operator()(Expr s, Expr b, Expr h, Expr q, Expr kv) const { return score_mod(s, b, h, q, kv); }
};

// score + table[h, dist[b, q, kv]]: node q attends to node kv with a bias learned per distance (distances
// past max_distance share one entry). Gradients reach `table` when it requires grad.
// Source: Ying et al., "Do Transformers Really Perform Bad for Graph Representation?", NeurIPS 2021 (spatial
// encoding, eq. 6); attention-gym attn_gym/mods/graphormer.py.
// ShapeError unless table is 2-D with at least max_distance + 2 columns; DTypeError unless it is floating point.
GraphormerSpatialBias graphormer_spatial_score_mod(const Tensor& table, const Tensor& adjacency, int64_t max_distance);

}  // namespace fg
