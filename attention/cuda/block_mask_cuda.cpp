// CUDA backend of BlockMask (attention/block_mask_kernels.h). create_block_mask evaluates the traced
// mask_mod with a generated kernel: emit_cuda_mods() lowers the program to fg_mask_mod, the template
// kernels/block_mask.cuh classifies the blocks, NVRTC compiles the pair once per program (jit.h caches it
// in memory and on disk). The block lists are built by the CUB kernels of block_mask_lists.cu.
#include <cstdint>

#include "flexgrad/attention/block_mask_kernels.h"
#include "flexgrad/attention/cuda/block_mask_lists.h"
#include "flexgrad/attention/cuda/flex_cuda_common.h"
#include "flexgrad/attention/cuda/jit.h"

namespace fg::cuda {
namespace {

constexpr int kThreads = 256;  // FG_BM_THREADS

// Host mirror of FgBlockMaskShape (kernels/block_mask.cuh).
struct BlockMaskShape {
  int64_t B, H, Be, He, q_len, kv_len;
  int32_t bq, bkv, nq, nkv;
};
static_assert(sizeof(BlockMaskShape) == 64, "BlockMaskShape must match FgBlockMaskShape");

Tensor eval_cuda(const ModProgram& program, int64_t B, int64_t H, int64_t Q_LEN, int64_t KV_LEN, BlockSize bs,
                 Device device) {
  // The generated mods take int positions.
  FG_CHECK(Q_LEN <= INT32_MAX && KV_LEN <= INT32_MAX && bs.q * bs.kv <= INT32_MAX, ValueError,
           "create_block_mask: Q_LEN, KV_LEN and the block area must fit in int32 on CUDA, got {}, {} and {}x{}", Q_LEN,
           KV_LEN, bs.q, bs.kv);
  const int64_t nQ = (Q_LEN + bs.q - 1) / bs.q, nKV = (KV_LEN + bs.kv - 1) / bs.kv;
  // Masks that ignore b (or h) are evaluated for one b (h); the kernel writes the result to every plane.
  const int64_t Be = program.uses(kUsesBatch) ? B : 1, He = program.uses(kUsesHead) ? H : 1;
  const int64_t tiles = Be * He * nQ * nKV;
  FG_CHECK(tiles <= INT32_MAX, ValueError,
           "create_block_mask: {} blocks to evaluate ({} x {} x {} x {}); CUDA launches take at most {}", tiles, Be, He,
           nQ, nKV, INT32_MAX);
  flex::ModContext ctx = flex::make_mod_context(nullptr, &program, nullptr, {}, device, "create_block_mask",
                                                IndexBounds{Be, He, Q_LEN, KV_LEN});
  jit::JitSource src;
  src.name = "block_mask";
  src.code = flex::assemble(ctx, {"FG_BM_THREADS " + std::to_string(kThreads)}, {"block_mask.cuh"});
  src.kernels = {"fg_block_mask_classify"};
  auto module = jit::get_module(src, device.index);

  Tensor bits = empty({B, H, nQ, nKV}, TensorOptions().dtype(kInt32).device(device));
  BlockMaskShape shape{B,
                       H,
                       Be,
                       He,
                       Q_LEN,
                       KV_LEN,
                       static_cast<int32_t>(bs.q),
                       static_cast<int32_t>(bs.kv),
                       static_cast<int32_t>(nQ),
                       static_cast<int32_t>(nKV)};
  int32_t* out = bits.data<int32_t>();
  void* args[] = {&ctx.args, &shape, &out};
  jit::launch(module->function("fg_block_mask_classify"), {static_cast<unsigned>(tiles)}, {kThreads}, 0, args,
              device.index);
  flex::check_mod_errors(ctx);
  return bits;
}

}  // namespace

FG_REGISTER_KERNEL(block_mask_eval_stub, CUDA, &eval_cuda);
FG_REGISTER_KERNEL(block_bits_stub, CUDA, &block_bits_cuda);
FG_REGISTER_KERNEL(block_lists_stub, CUDA, &block_lists_cuda);

}  // namespace fg::cuda
