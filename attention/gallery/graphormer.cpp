// Graphormer spatial encoding (see graphormer.h).
#include "flexgrad/attention/gallery/graphormer.h"

#include <algorithm>
#include <vector>

namespace fg {

Tensor shortest_path_distances(const Tensor& adjacency, int64_t max_distance) {
  const Tensor& a = adjacency;
  FG_CHECK(a.defined() && a.dim() == 3 && a.size(1) == a.size(2), ShapeError,
           "shortest_path_distances: adjacency must be [B, N, N], got {}",
           a.defined() ? shape_str(a.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(!a.is_floating_point(), DTypeError, "shortest_path_distances: adjacency must be bool or integer, got {}",
           a.dtype());
  FG_CHECK(max_distance >= 0, ValueError, "shortest_path_distances: max_distance must be >= 0, got {}", max_distance);
  const int64_t B = a.size(0), N = a.size(1);
  FG_CHECK(N <= (int64_t{1} << 30) && max_distance < (int64_t{1} << 30), ValueError,
           "shortest_path_distances: N = {} nodes or max_distance = {} is past int32 distances", N, max_distance);
  const int32_t unreachable = static_cast<int32_t>(std::max(N, max_distance + 1));
  const int32_t cap = static_cast<int32_t>(max_distance + 1);
  const std::vector<double> adj = a.cpu().to_vector();
  std::vector<int32_t> dist(static_cast<size_t>(B * N * N));
  for (int64_t b = 0; b < B; ++b) {
    int32_t* d = dist.data() + b * N * N;
    const double* e = adj.data() + b * N * N;
    for (int64_t i = 0; i < N; ++i)
      for (int64_t j = 0; j < N; ++j) d[i * N + j] = i == j ? 0 : e[i * N + j] != 0 ? 1 : unreachable;
    // Floyd-Warshall; a real path is shorter than N <= unreachable, so unreachable never wins a min.
    for (int64_t k = 0; k < N; ++k)
      for (int64_t i = 0; i < N; ++i) {
        const int32_t dik = d[i * N + k];
        if (dik == unreachable) continue;
        for (int64_t j = 0; j < N; ++j) d[i * N + j] = std::min(d[i * N + j], dik + d[k * N + j]);
      }
    for (int64_t i = 0; i < N * N; ++i) d[i] = std::min(d[i], cap);
  }
  return from_vector(dist, {B, N, N}, kInt32).to(a.device());
}

GraphormerSpatialBias graphormer_spatial_score_mod(const Tensor& table, const Tensor& adjacency, int64_t max_distance) {
  FG_CHECK(max_distance >= 0, ValueError, "graphormer_spatial_score_mod: max_distance must be >= 0, got {}",
           max_distance);
  FG_CHECK(table.defined() && table.dim() == 2 && table.size(1) >= max_distance + 2, ShapeError,
           "graphormer_spatial_score_mod: table must be [H, >= max_distance + 2 = {}], got {}", max_distance + 2,
           table.defined() ? shape_str(table.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(table.is_floating_point(), DTypeError, "graphormer_spatial_score_mod: table must be floating point, got {}",
           table.dtype());
  GraphormerSpatialBias g{nullptr, table, shortest_path_distances(adjacency, max_distance)};
  Captured t(table, "spatial_table"), dist(g.distance, "distance");
  g.score_mod = [t, dist](Expr s, Expr b, Expr h, Expr q, Expr kv) { return s + Expr(t[h][dist[b][q][kv]]); };
  return g;
}

}  // namespace fg
