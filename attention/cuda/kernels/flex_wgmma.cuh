// Hopper (sm_90a) warpgroup matrix multiply helpers for the FlexAttention templates: shared-memory matrix
// descriptors, wgmma.mma_async wrappers and the fences around them. NVRTC only, after flex_mma.cuh; only for
// sm_90a (wgmma does not exist elsewhere). Building blocks of the Hopper main loop (issue 13), checked against
// a float64 product by tests/cuda/test_wgmma.cpp (the n64 forms); flex_forward_wgmma.cuh runs them.
//
// Operands in shared memory use the 128-byte swizzle: a tile of 128-byte rows (64 bf16 / f16), aligned to
// 1024 bytes, stores 16-byte chunk c of row r at chunk c ^ (r & 7) (fg_swizzle_b16 of flex_mma.cuh with
// row_elems 64). Descriptors (PTX ISA, "Matrix Descriptor Format"):
//   K-major operand (rows = M or N, 64 k per row; A = Q, B = K for S = Q K^T): 8-row groups 1024 bytes apart
//     (stride byte offset); the leading byte offset is unused. The k16 step j starts 32 * j bytes into the row.
//   MN-major operand (rows = k, 64 n per row; B = V for O = P V, "transposed B"): 8-row (k) groups 1024 bytes
//     apart; one 64-column atom per descriptor (both offsets 1024, so either reading of them is right). The k16
//     step j starts at row 16 j (2048 * j bytes).
// Accumulators (m64nN, f32): warp w of the warpgroup holds rows 16 w .. 16 w + 15 as mma.sync C fragments:
// d[4 j + 0, 1] = row 16 w + g, columns 8 j + 2 t, + 1; d[4 j + 2, 3] = row 16 w + g + 8 (lane = 4 g + t).
// A from registers (fg_wgmma_m64n64k16_rs) takes mma.sync's A fragment of the warp's 16 rows.
#pragma once

// Descriptor of a 128-byte-swizzled operand starting at shared address `smem_addr`.
__device__ __forceinline__ unsigned long long fg_gmma_desc_sw128(unsigned smem_addr, unsigned lbo_bytes,
                                                                 unsigned sbo_bytes) {
  unsigned long long d = (unsigned long long)((smem_addr & 0x3FFFF) >> 4);
  d |= (unsigned long long)((lbo_bytes & 0x3FFFF) >> 4) << 16;
  d |= (unsigned long long)((sbo_bytes & 0x3FFFF) >> 4) << 32;
  d |= 1ull << 62;  // 128-byte swizzle
  return d;
}

// Generic-proxy writes to shared memory (st.shared) become visible to wgmma (the async proxy).
__device__ __forceinline__ void fg_fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
__device__ __forceinline__ void fg_wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void fg_wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void fg_wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accumulator registers across an in-flight wgmma.
template <int N>
__device__ __forceinline__ void fg_wgmma_fence_operands(float* d) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (64 x 64, f32) = A (64 x 16) * B (16 x 64) + (accumulate ? d : 0); A and B in shared memory; TRANS_B 1 when
// B is MN-major, TRANS_A 1 when A is (rows = k, 64 m a row: dQ = dS K from a stored dS^T). BF16 1: bf16
// operands, else f16.
template <int TRANS_B, int BF16, int TRANS_A = 0>
__device__ __forceinline__ void fg_wgmma_m64n64k16_ss(float* d, unsigned long long da, unsigned long long db,
                                                      int accumulate) {
  if (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %36, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_B), "n"(TRANS_A));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, %36, %35;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_B), "n"(TRANS_A));
  }
}

// d (64 x 128, f32) = A (64 x 16) * B (16 x 128) + (accumulate ? d : 0), both in shared memory: S = Q K^T over a
// 128-column kv tile. A K-major B of 128 rows is the n64 layout continued (8-row groups 1024 bytes apart).
template <int TRANS_B, int BF16>
__device__ __forceinline__ void fg_wgmma_m64n128k16_ss(float* d, unsigned long long da, unsigned long long db,
                                                       int accumulate) {
  if (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, %67;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(accumulate), "n"(TRANS_B));
  }
}

// m64nNk16 with both operands in shared memory, N = 64 or 128 (d holds N / 2 floats per thread).
template <int N, int TRANS_B, int BF16>
__device__ __forceinline__ void fg_wgmma_ss(float* d, unsigned long long da, unsigned long long db, int accumulate) {
  static_assert(N == 64 || N == 128, "fg_wgmma_ss: N is 64 or 128");
  if constexpr (N == 64) fg_wgmma_m64n64k16_ss<TRANS_B, BF16>(d, da, db, accumulate);
  else fg_wgmma_m64n128k16_ss<TRANS_B, BF16>(d, da, db, accumulate);
}

// The same with A from registers: a[0..3] is the mma.sync A fragment (16 x 16) of this warp's 16 rows.
template <int TRANS_B, int BF16>
__device__ __forceinline__ void fg_wgmma_m64n64k16_rs(float* d, const unsigned* a, unsigned long long db,
                                                      int accumulate) {
  if (BF16) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TRANS_B));
  } else {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(accumulate), "n"(TRANS_B));
  }
}

// ---- for the pipelined forward (flex_forward_wgmma.cuh, FG_WGMMA_PIPE) ----
// The register A operand of an in-flight wgmma (fg_wgmma_m64n64k16_rs) is read asynchronously: keeping it "used"
// after the wait stops the compiler from giving its registers to other values while the tensor cores read them.
template <int N>
__device__ __forceinline__ void fg_wgmma_fence_operands_u(unsigned* a) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i])::"memory");
}

// mbarriers (shared memory, 8 bytes each) for the warp-specialised main loop (flex_forward_wgmma.cuh,
// FG_WGMMA_PIPE 2): a phase completes when `count` arrivals have come; waiters poll its parity.
__device__ __forceinline__ void fg_mbar_init(unsigned addr, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(addr), "r"(count) : "memory");
}
// Makes the initialisations visible before any other thread uses the barriers (with a __syncthreads after).
__device__ __forceinline__ void fg_mbar_fence_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// One arrival (release: this thread's earlier shared-memory writes are seen by the phase's waiters).
__device__ __forceinline__ void fg_mbar_arrive(unsigned addr) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}" ::"r"(addr) : "memory");
}
// `n` arrivals at once (a thread standing for its cp.async arrival too where it issued none: TMA stages).
__device__ __forceinline__ void fg_mbar_arrive_n(unsigned addr, unsigned n) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0], %1;\n}" ::"r"(addr), "r"(n) : "memory");
}
// The warp-specialised kernels' stage "full" barriers: two arrivals from each of the 128 producer threads a phase,
// its cp.async copies' (fg_cp_async_mbar_arrive, .noinc: compute-sanitizer's synccheck reports the form that raises
// the pending count instead as a "missing wait") and its publishing one (fg_ws_publish), which counts twice where
// the thread issued no cp.async arrival (TMA stages, an end-of-walk marker).
#define FG_WS_FULL_COUNT 256
// A producer thread's last arrival on a stage's full barrier (release: what it wrote for the stage before, e.g. the
// mods' column parts, is seen by the consumers' waits).
__device__ __forceinline__ void fg_ws_publish(unsigned bar, bool copies_arrive) { fg_mbar_arrive_n(bar, copies_arrive ? 1u : 2u); }
// One arrival when every cp.async this thread issued so far has landed (counted in the barrier's `count`).
__device__ __forceinline__ void fg_cp_async_mbar_arrive(unsigned addr) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(addr) : "memory");
}
// Tells the barrier's current phase `bytes` more are coming from TMA copies (complete_tx), without arriving.
__device__ __forceinline__ void fg_mbar_expect_tx(unsigned addr, unsigned bytes) {
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;" ::"r"(addr), "r"(bytes) : "memory");
}

// Host mirror of a CUtensorMap (cuda.h; attention/cuda/tma_map.h): 128 opaque bytes, 64-byte aligned, passed as a
// __grid_constant__ kernel parameter.
struct __align__(64) FgTmaMap {
  unsigned long long opaque[16];
};

// TMA (sm_90): a box of a 4-d tensor described by `map` (a CUtensorMap in kernel parameter space,
// __grid_constant__, built on the host by cuTensorMapEncodeTiled) at coordinates (c0, c1, c2, c3), innermost
// first, into shared memory at dst (1024-byte aligned for the 128-byte swizzle); its bytes complete_tx on the
// mbarrier at `bar`. Elements outside the tensor arrive as zeros.
__device__ __forceinline__ void fg_tma_load_4d(unsigned dst, const void* map, int c0, int c1, int c2, int c3,
                                               unsigned bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];" ::"r"(dst),
      "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
      : "memory");
}

// TMA reduce (sm_90): adds the box of shared memory at src (laid out as the map's box, 1024-byte aligned for the
// 128-byte swizzle) to the 4-d tensor described by `map` at (c0, c1, c2, c3), element by element in L2 (the map's
// type: float32 adds, in any order); elements outside the tensor are dropped. Tracked by this thread's bulk groups.
__device__ __forceinline__ void fg_tma_reduce_add_4d(const void* map, unsigned src, int c0, int c1, int c2, int c3) {
  asm volatile("cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];" ::
                   "l"(map),
               "r"(src), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
               : "memory");
}
__device__ __forceinline__ void fg_bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
// This thread's bulk groups but the newest N have read their shared memory (it may be written again) / have
// completed (their writes are done).
template <int N>
__device__ __forceinline__ void fg_bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}
template <int N>
__device__ __forceinline__ void fg_bulk_wait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// Waits until the phase with parity `phase` has completed (acquire).
__device__ __forceinline__ void fg_mbar_wait(unsigned addr, unsigned phase) {
  asm volatile(
      "{\n.reg .pred done;\nFG_MBAR_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra FG_MBAR_WAIT;\n}" ::"r"(addr),
      "r"(phase)
      : "memory");
}

// Named CTA barriers (ids 1-15; 0 is __syncthreads): `threads` (a multiple of 32) must reach barrier `id`, the
// ones that sync wait there, the ones that arrive go on. Used where two warpgroups take turns.
__device__ __forceinline__ void fg_named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void fg_named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// A persistent kernel's queue of the grid CTAs it runs in place of its grid (dynamic: a CTA takes its next grid CTA
// once it has room for it, as the hardware gives out a grid's CTAs; each grid CTA still runs once, on one CTA). The
// `lead` warpgroup (the producer: it runs ahead) waits until the previous grid CTA's resident tile is released
// (`tile_free`) and the slot is free, and its first thread takes a number from a global counter the host zeroed for
// the launch and publishes it in one of two shared slots on the slot's full mbarrier (1 arrival); every warp of the
// CTA reads a slot and its lane 0 arrives on the slot's empty mbarrier (`warps` arrivals), so that a slot is refilled
// only once all have read it. -1: none left. (Taking a number earlier, one grid CTA ahead, let a CTA hold two it had
// not started: on a grid of no more grid CTAs than SMs half the CTAs took them all. With one producer thread waiting
// alone, ptxas spilled 200 bytes more in the forward's producer; with a consumer as the lead it serialised the
// forward's wgmma, C7520, and spilled in the dK/dV kernel's consumers.)
struct FgJobQueue {
  unsigned long long full[2], empty[2];
  int slot[2];
};
__device__ __forceinline__ void fg_job_queue_init(FgJobQueue& q, unsigned warps) {  // one thread, before a CTA barrier
  for (int s = 0; s < 2; ++s) {
    fg_mbar_init(fg_smem_addr(&q.full[s]), 1);
    fg_mbar_init(fg_smem_addr(&q.empty[s]), warps);
  }
}
// The CTA's `it`-th grid CTA (every thread of the CTA calls it with it = 0, 1, ... until -1). The lead warpgroup
// first waits for `tile_free` (an mbarrier completing once a grid CTA's resident tile is released) to have completed
// `tiles_run` phases, the resident tiles of the grid CTAs this CTA has run. (Plain accesses to the slots: the
// barriers' asm orders them, and volatile ones made ptxas spill 250 bytes more in the forward's producer.)
__device__ __forceinline__ int fg_job_take(FgJobQueue& q, int it, int* counter, int njobs, bool lead,
                                           unsigned tile_free, int tiles_run) {
  const int s = it & 1;
  if (lead) {
    if (tiles_run > 0) fg_mbar_wait(tile_free, (tiles_run - 1) & 1);
    // Slot s held grid CTA it - 2, which every warp has read once the slot's empty barrier completes.
    if (it >= 2) fg_mbar_wait(fg_smem_addr(&q.empty[s]), ((it >> 1) - 1) & 1);
    if (threadIdx.x % 128 == 0) {
      const int job = atomicAdd(counter, 1);
      q.slot[s] = job < njobs ? job : -1;
      fg_mbar_arrive(fg_smem_addr(&q.full[s]));  // (release: the slot's write is seen by the waiters' acquire)
    }
  }
  fg_mbar_wait(fg_smem_addr(&q.full[s]), (it >> 1) & 1);
  const int job = q.slot[s];
  __syncwarp();
  if ((threadIdx.x & 31) == 0) fg_mbar_arrive(fg_smem_addr(&q.empty[s]));
  return job;
}

// Warpgroup register reallocation (every warp of the warpgroup executes it): the producer warpgroup of the
// warp-specialised loop gives registers back, the consumers take them (their sum stays within the SM's 64K).
template <int N>
__device__ __forceinline__ void fg_setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void fg_setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(N));
}
