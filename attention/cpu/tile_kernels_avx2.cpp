// The tile kernels for AVX2 + FMA (compiled with -mavx2 -mfma, see CMakeLists.txt); tile_kernels() calls
// them only on a CPU that has these features.
#include <immintrin.h>

#include "flexgrad/attention/cpu/tile_kernels_impl.h"

namespace fg::cpu {
namespace {
struct Avx2 {
  static constexpr int W = 8, MR = 6, NV = 2;  // 12 accumulators + 2 B vectors + 1 A broadcast of 16 registers
  typedef float V __attribute__((vector_size(32)));
  typedef int32_t VI __attribute__((vector_size(32)));
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
};
}  // namespace

const TileKernels& tile_kernels_avx2() { return tile_impl::make_table<Avx2>("avx2"); }

}  // namespace fg::cpu
