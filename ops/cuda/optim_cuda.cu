// CUDA kernels of ops/optim_kernels.h: multi-tensor apply. The host cuts every tensor of the call into
// chunks of kChunk elements and uploads one table (the slots' pointers, then (slot, start, length) per
// chunk) with a single copy; one launch then updates every parameter, one block per chunk. The norm is
// two launches (a partial sum per chunk, then one block adding the partials in a fixed order, so the
// result is bitwise reproducible) and one device-to-host copy.
#include <cstring>

#include "flexgrad/ops/cuda/cuda_common.cuh"
#include "flexgrad/ops/cuda/layout_device.cuh"
#include "flexgrad/ops/optim_kernels.h"

namespace fg::cuda {
namespace {

constexpr int64_t kChunk = 32768;

struct Chunk {
  int64_t slot, start, len;
};

// The table on the device: slots[n_slots] then chunks[n_chunks], in one Workspace.
template <class Slot>
struct Table {
  Workspace ws;
  const Slot* slots;
  const Chunk* chunks;
  int64_t n_chunks;
  Table(const std::vector<Slot>& s, const std::vector<Chunk>& c, int device)
      : ws(sizeof(Slot) * s.size() + sizeof(Chunk) * c.size(), device), n_chunks(static_cast<int64_t>(c.size())) {
    static_assert(sizeof(Slot) % alignof(Chunk) == 0);
    std::vector<char> host(sizeof(Slot) * s.size() + sizeof(Chunk) * c.size());
    std::memcpy(host.data(), s.data(), sizeof(Slot) * s.size());
    std::memcpy(host.data() + sizeof(Slot) * s.size(), c.data(), sizeof(Chunk) * c.size());
    // Through flexgrad's pinned staging on the device's current stream (the kernels' stream): no stream
    // synchronisation, and `host` may go out of scope once the call returns.
    copy_async(ws.get(), Device(DeviceType::CUDA, device), host.data(), kCPU, host.size());
    slots = ws.as<Slot>();
    chunks = reinterpret_cast<const Chunk*>(ws.as<char>() + sizeof(Slot) * s.size());
  }
};

template <class Slot>
std::vector<Chunk> chunks_of(const std::vector<Slot>& slots) {
  std::vector<Chunk> out;
  for (size_t s = 0; s < slots.size(); ++s) {
    for (int64_t b = 0; b < slots[s].numel; b += kChunk)
      out.push_back({static_cast<int64_t>(s), b, std::min(kChunk, slots[s].numel - b)});
  }
  return out;
}

template <class D, OptimKind KIND>
__global__ void __launch_bounds__(kThreads) optim_step_kernel(const OptimSlot* __restrict__ slots,
                                                              const Chunk* __restrict__ chunks, OptimStep o) {
  using C = dc_t<D>;
  const Chunk k = chunks[blockIdx.x];
  const OptimSlot s = slots[k.slot];
  D* p = static_cast<D*>(s.param) + k.start;
  const D* gp = static_cast<const D*>(s.grad) + k.start;
  D* st1 = s.state1 ? static_cast<D*>(s.state1) + k.start : nullptr;
  D* st2 = s.state2 ? static_cast<D*>(s.state2) + k.start : nullptr;
  const C wd = static_cast<C>(o.weight_decay);
  if constexpr (KIND == OptimKind::SGD) {
    const C lr = static_cast<C>(o.lr), mom = static_cast<C>(o.momentum), keep = static_cast<C>(1 - o.dampening);
    for (int64_t i = threadIdx.x; i < k.len; i += blockDim.x) {
      const C pv = load_c(p[i]);
      C g = load_c(gp[i]);
      if (o.weight_decay != 0) g = g + wd * pv;
      if (o.momentum != 0) {
        const D b = store_c<D>(s.fresh ? g : mom * load_c(st1[i]) + keep * g);
        st1[i] = b;
        const C bv = load_c(b);
        g = o.nesterov ? g + mom * bv : bv;
      }
      p[i] = store_c<D>(pv + -lr * g);
    }
  } else {
    const C decay = static_cast<C>(1 - o.lr * o.weight_decay), b1 = static_cast<C>(o.beta1),
            b2 = static_cast<C>(o.beta2), k1 = static_cast<C>(1 - o.beta1), k2 = static_cast<C>(1 - o.beta2),
            eps = static_cast<C>(o.eps), step = static_cast<C>(o.step_size), sbc2 = static_cast<C>(o.sqrt_bc2);
    for (int64_t i = threadIdx.x; i < k.len; i += blockDim.x) {
      C pv = load_c(p[i]);
      C g = load_c(gp[i]);
      if (o.weight_decay != 0) {
        if (o.decoupled) pv = pv * decay;
        else g = g + wd * pv;
      }
      const D m = store_c<D>(b1 * load_c(st1[i]) + k1 * g);
      const D v = store_c<D>(b2 * load_c(st2[i]) + k2 * (g * g));
      st1[i] = m;
      st2[i] = v;
      const C denom = ::sqrt(load_c(v)) / sbc2 + eps;  // IEEE sqrt and division (no fast-math approximations)
      p[i] = store_c<D>(pv + -step * (load_c(m) / denom));
    }
  }
}

template <class D>
__global__ void __launch_bounds__(kThreads) sq_sum_kernel(const GradSlot* __restrict__ slots,
                                                          const Chunk* __restrict__ chunks, double* __restrict__ partial) {
  __shared__ double shared[32];
  const Chunk k = chunks[blockIdx.x];
  const D* g = static_cast<const D*>(slots[k.slot].data) + k.start;
  double acc = 0;
  for (int64_t i = threadIdx.x; i < k.len; i += blockDim.x) {
    const double x = static_cast<double>(load_c(g[i]));
    acc += x * x;
  }
  acc = block_reduce(acc, [](double a, double b) { return a + b; }, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: thread t adds partials t, t + blockDim, ... then the block reduces in a fixed shape.
__global__ void __launch_bounds__(kThreads) sum_partials_kernel(const double* __restrict__ partial, int64_t n,
                                                                double* __restrict__ out) {
  __shared__ double shared[32];
  double acc = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
  acc = block_reduce(acc, [](double a, double b) { return a + b; }, shared);
  if (threadIdx.x == 0) *out = acc;
}

template <class D>
__global__ void __launch_bounds__(kThreads) scale_kernel(const GradSlot* __restrict__ slots,
                                                         const Chunk* __restrict__ chunks, dc_t<D> coef) {
  const Chunk k = chunks[blockIdx.x];
  D* g = static_cast<D*>(slots[k.slot].data) + k.start;
  for (int64_t i = threadIdx.x; i < k.len; i += blockDim.x) g[i] = store_c<D>(load_c(g[i]) * coef);
}

void check_grid(int64_t n_chunks) {
  FG_CHECK(n_chunks <= 0x7fffffff, ValueError, "multi-tensor apply: {} chunks exceed one launch", n_chunks);
}

void optim_step_cuda(int device, DType dtype, const std::vector<OptimSlot>& slots, const OptimStep& o) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  if (chunks.empty()) return;
  check_grid(static_cast<int64_t>(chunks.size()));
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  Table<OptimSlot> t(slots, chunks, device);
  dispatch_floating(dtype, "optimizer step", [&]<class D>() {
    const unsigned grid = static_cast<unsigned>(t.n_chunks);
    if (o.kind == OptimKind::SGD) optim_step_kernel<D, OptimKind::SGD><<<grid, kThreads, 0, s>>>(t.slots, t.chunks, o);
    else optim_step_kernel<D, OptimKind::Adam><<<grid, kThreads, 0, s>>>(t.slots, t.chunks, o);
    FG_CUDA_CHECK_LAUNCH();
  });
}

double grad_sq_sum_cuda(int device, DType dtype, const std::vector<GradSlot>& slots) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  if (chunks.empty()) return 0;
  check_grid(static_cast<int64_t>(chunks.size()));
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  Table<GradSlot> t(slots, chunks, device);
  Workspace partial(sizeof(double) * (chunks.size() + 1), device);
  double* out = partial.as<double>() + chunks.size();
  dispatch_floating(dtype, "clip_grad_norm_", [&]<class D>() {
    sq_sum_kernel<D><<<static_cast<unsigned>(t.n_chunks), kThreads, 0, s>>>(t.slots, t.chunks, partial.as<double>());
    FG_CUDA_CHECK_LAUNCH();
  });
  sum_partials_kernel<<<1, kThreads, 0, s>>>(partial.as<double>(), t.n_chunks, out);
  FG_CUDA_CHECK_LAUNCH();
  double host = 0;
  FG_CUDA_CHECK(cudaMemcpyAsync(&host, out, sizeof(double), cudaMemcpyDeviceToHost, s));
  FG_CUDA_CHECK(cudaStreamSynchronize(s));  // the one host synchronisation of clip_grad_norm_
  return host;
}

void grad_scale_cuda(int device, DType dtype, const std::vector<GradSlot>& slots, double coef) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  if (chunks.empty()) return;
  check_grid(static_cast<int64_t>(chunks.size()));
  DeviceGuard guard(device);
  cudaStream_t s = stream(device);
  Table<GradSlot> t(slots, chunks, device);
  dispatch_floating(dtype, "clip_grad_norm_", [&]<class D>() {
    scale_kernel<D><<<static_cast<unsigned>(t.n_chunks), kThreads, 0, s>>>(t.slots, t.chunks,
                                                                             static_cast<dc_t<D>>(coef));
    FG_CUDA_CHECK_LAUNCH();
  });
}

}  // namespace

FG_REGISTER_KERNEL(optim_step_stub, CUDA, optim_step_cuda);
FG_REGISTER_KERNEL(grad_sq_sum_stub, CUDA, grad_sq_sum_cuda);
FG_REGISTER_KERNEL(grad_scale_stub, CUDA, grad_scale_cuda);

}  // namespace fg::cuda
