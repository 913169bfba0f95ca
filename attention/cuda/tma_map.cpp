// TMA tensor maps through cuTensorMapEncodeTiled (attention/cuda/tma_map.h).
#include "flexgrad/attention/cuda/tma_map.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstring>

namespace fg::cuda {
namespace {

// The bytes are copied out of a CUtensorMap (CUDA 13 aligns it to 128; the kernels need 64 in parameter space).
static_assert(sizeof(TmaMap) == sizeof(CUtensorMap), "TmaMap holds a CUtensorMap's bytes");

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's cuTensorMapEncodeTiled (CUDA 12.0's signature), or null when the driver has none.
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      p = nullptr;
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

}  // namespace

std::string encode_tma_map_sw128(TmaMap& out, const Tensor& t, int box_rows) {
  if (t.dim() != 4 || (t.dtype() != kBFloat16 && t.dtype() != kFloat16 && t.dtype() != kFloat32) || t.stride(3) != 1)
    return "needs a 4-d bfloat16 / float16 / float32 tensor with a contiguous last dim";
  if (box_rows < 1 || box_rows > 256) return "a box has 1 to 256 rows";
  const EncodeTiled fn = encode_tiled();
  if (fn == nullptr) return "the driver has no cuTensorMapEncodeTiled";
  const uint64_t es = t.dtype() == kFloat32 ? 4 : 2;
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(t.size(3)), static_cast<cuuint64_t>(t.size(2)),
                              static_cast<cuuint64_t>(t.size(1)), static_cast<cuuint64_t>(t.size(0))};
  // Byte strides of dims 1..3; a dim of size 1 is never stepped, so it takes the nested stride (any stride
  // of a size-1 dim, 0 included, is legal in a Tensor but not in a tensor map).
  cuuint64_t strides[3];
  uint64_t nested = dims[0] * es;
  for (int d = 0; d < 3; ++d) {
    const int64_t td = 2 - d;  // tensor dim of map dim d + 1
    const uint64_t s = t.size(td) == 1 ? nested : static_cast<uint64_t>(t.stride(td)) * es;
    if (s % 16 != 0 || s >= (uint64_t{1} << 40)) return "strides must be multiples of 16 bytes below 2^40";
    strides[d] = s;
    nested = s * dims[d + 1];
  }
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return "the data must be 16-byte aligned";
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(128 / es), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUtensorMapDataType type = t.dtype() == kBFloat16  ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16
                                   : t.dtype() == kFloat16 ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                           : CU_TENSOR_MAP_DATA_TYPE_FLOAT32;
  const CUresult r = fn(&map, type, 4, t.data_ptr(), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) return "cuTensorMapEncodeTiled returned " + std::to_string(static_cast<int>(r));
  static_assert(sizeof(map) == sizeof(out.bytes));
  std::memcpy(out.bytes, &map, sizeof map);
  return "";
}

}  // namespace fg::cuda
