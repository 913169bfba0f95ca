// The tile kernels for any x86-64 (SSE2, no FMA: products and sums rounded separately); the fallback
// tile_kernels() takes on a CPU without AVX2.
#include "flexgrad/attention/cpu/tile_kernels_impl.h"

namespace fg::cpu {
namespace {
struct Generic {
  static constexpr int W = 4, MR = 4, NV = 2;
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t VI __attribute__((vector_size(16)));
  static V fma(V a, V b, V c) { return a * b + c; }
  static float fma1(float a, float b, float c) { return a * b + c; }
};
}  // namespace

const TileKernels& tile_kernels_generic() { return tile_impl::make_table<Generic>("generic"); }

}  // namespace fg::cpu
