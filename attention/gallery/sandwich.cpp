// Sandwich bias (see sandwich.h).
#include "flexgrad/attention/gallery/sandwich.h"

#include <cmath>
#include <vector>

namespace fg {

SandwichBias sandwich_score_mod(int64_t heads, int64_t max_seq_len, int64_t d_bar, Device device) {
  FG_CHECK(heads >= 1, ValueError, "sandwich_score_mod: heads must be >= 1, got {}", heads);
  FG_CHECK(max_seq_len >= 1, ValueError, "sandwich_score_mod: max_seq_len must be >= 1, got {}", max_seq_len);
  FG_CHECK(d_bar >= 2, ValueError, "sandwich_score_mod: d_bar must be >= 2, got {}", d_bar);
  // float32 throughout, in attention-gym's order of operations, the terms summed pairwise (halving, as a GPU
  // reduction does): the table is then a float32 implementation's up to the rounding of cos and of the sum
  // (against PyTorch's on an H200: within 1 float32 ulp).
  std::vector<float> freq(static_cast<size_t>(d_bar / 2));
  for (size_t i = 0; i < freq.size(); ++i)
    freq[i] = 1.0f / std::pow(10000.0f, (2.0f * static_cast<float>(i)) / static_cast<float>(d_bar));
  const int64_t padded = (2 * max_seq_len - 1 + 7) / 8 * 8;  // a multiple of 8: aligned vector loads
  std::vector<float> rel(static_cast<size_t>(padded)), terms(freq.size());
  for (int64_t j = 0; j < padded; ++j) {
    const float dist = std::fabs(static_cast<float>(j) - static_cast<float>(max_seq_len - 1));
    for (size_t i = 0; i < freq.size(); ++i) terms[i] = std::cos(dist * freq[i]);
    for (size_t m = terms.size(); m > 1;) {
      const size_t half = (m + 1) / 2;
      for (size_t i = 0; i + half < m; ++i) terms[i] += terms[i + half];
      m = half;
    }
    rel[static_cast<size_t>(j)] = terms[0];
  }
  std::vector<float> scale(static_cast<size_t>(heads));
  for (int64_t h = 0; h < heads; ++h)
    scale[static_cast<size_t>(h)] = static_cast<float>(heads) / (8.0f * static_cast<float>(h + 1));
  SandwichBias s{nullptr, from_vector(rel, {padded}, kFloat32).to(device),
                 from_vector(scale, {heads}, kFloat32).to(device)};
  Captured bias(s.rel_bias, "rel_bias"), hs(s.head_scale, "head_scale");
  const int64_t offset = max_seq_len - 1;
  s.score_mod = [bias, hs, offset](Expr score, Expr, Expr h, Expr q, Expr kv) {
    return score + Expr(bias[q - kv + offset]) * Expr(hs[h]);
  };
  return s;
}

}  // namespace fg
