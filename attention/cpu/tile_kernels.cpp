// Runtime choice of the tile kernels (tile_kernels.h): by CPU feature detection, once per process.
#include "flexgrad/attention/cpu/tile_kernels.h"

#include <cstdlib>
#include <string>

#include "flexgrad/tensor/error.h"

namespace fg::cpu {

bool cpu_supports(TileIsa isa) {
  switch (isa) {
    case TileIsa::Avx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma");
    case TileIsa::Avx512Bf16: return cpu_supports(TileIsa::Avx512) && __builtin_cpu_supports("avx512bf16");
    case TileIsa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case TileIsa::Generic: return true;
  }
  return false;
}

const TileKernels& tile_kernels(TileIsa isa) {
  const char* names[] = {"generic", "avx2", "avx512", "avx512_bf16"};
  FG_CHECK(cpu_supports(isa), ValueError, "tile_kernels: this CPU does not support the {} kernels",
           names[static_cast<int>(isa)]);
  switch (isa) {
    case TileIsa::Avx512Bf16: return tile_kernels_avx512_bf16();
    case TileIsa::Avx512: return tile_kernels_avx512();
    case TileIsa::Avx2: return tile_kernels_avx2();
    case TileIsa::Generic: break;
  }
  return tile_kernels_generic();
}

namespace {
const TileKernels& choose() {
  if (const char* env = std::getenv("FLEXGRAD_CPU_ISA"); env && *env) {
    const std::string s = env;
    FG_CHECK(s == "avx512_bf16" || s == "avx512" || s == "avx2" || s == "generic", ValueError,
             "FLEXGRAD_CPU_ISA: expected avx512_bf16, avx512, avx2 or generic, got '{}'", s);
    return tile_kernels(s == "avx512_bf16" ? TileIsa::Avx512Bf16
                        : s == "avx512"    ? TileIsa::Avx512
                        : s == "avx2"      ? TileIsa::Avx2
                                           : TileIsa::Generic);
  }
  for (TileIsa isa : {TileIsa::Avx512Bf16, TileIsa::Avx512, TileIsa::Avx2}) {
    if (cpu_supports(isa)) return tile_kernels(isa);
  }
  return tile_kernels_generic();
}
}  // namespace

const TileKernels& tile_kernels() {
  static const TileKernels& chosen = choose();
  return chosen;
}

}  // namespace fg::cpu
