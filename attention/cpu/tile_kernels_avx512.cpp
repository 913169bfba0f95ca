// The tile kernels for AVX-512 (compiled with -mavx512f -mavx512dq -mavx512bw -mavx512vl -mfma, see
// CMakeLists.txt); tile_kernels() calls them only on a CPU that has these features.
#include <immintrin.h>

#include "flexgrad/attention/cpu/tile_kernels_impl.h"

namespace fg::cpu {
namespace {
struct Avx512 {
  static constexpr int W = 16, MR = 6, NV = 4;  // 24 accumulators + 4 B vectors of the 32 registers
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t VI __attribute__((vector_size(64)));
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  // a * 2^n in one instruction (the zero-masked form: GCC 12 warns about the plain one's undefined operand)
  static V scalef(V a, V n) { return _mm512_maskz_scalef_ps(static_cast<__mmask16>(0xffff), a, n); }
  static float fma1(float a, float b, float c) { return std::fma(a, b, c); }
};
}  // namespace

const TileKernels& tile_kernels_avx512() { return tile_impl::make_table<Avx512>("avx512"); }

}  // namespace fg::cpu
