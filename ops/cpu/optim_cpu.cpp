// CPU kernels of ops/optim_kernels.h. All tensors of a call are cut into chunks of kChunk elements that
// OpenMP threads take in parallel; the norm's per-chunk partial sums are added in chunk order, so the
// result does not depend on the number of threads.
#include <cmath>

#include "flexgrad/ops/optim_kernels.h"

namespace fg {
namespace {

constexpr int64_t kChunk = 32768;

struct Chunk {
  int32_t slot;
  int64_t start, len;
};

template <class Slot>
std::vector<Chunk> chunks_of(const std::vector<Slot>& slots) {
  std::vector<Chunk> out;
  for (size_t s = 0; s < slots.size(); ++s) {
    for (int64_t b = 0; b < slots[s].numel; b += kChunk)
      out.push_back({static_cast<int32_t>(s), b, std::min(kChunk, slots[s].numel - b)});
  }
  return out;
}

template <class T>
void sgd_chunk(const OptimSlot& s, int64_t b, int64_t n, const OptimStep& o) {
  using C = compute_t<T>;
  T* p = static_cast<T*>(s.param) + b;
  const T* gp = static_cast<const T*>(s.grad) + b;
  T* buf = s.state1 ? static_cast<T*>(s.state1) + b : nullptr;
  const C lr = static_cast<C>(o.lr), wd = static_cast<C>(o.weight_decay), mom = static_cast<C>(o.momentum),
          keep = static_cast<C>(1 - o.dampening);
  for (int64_t i = 0; i < n; ++i) {
    const C pv = static_cast<C>(p[i]);
    C g = static_cast<C>(gp[i]);
    if (o.weight_decay != 0) g = g + wd * pv;
    if (o.momentum != 0) {
      C bv = s.fresh ? g : mom * static_cast<C>(buf[i]) + keep * g;
      buf[i] = static_cast<T>(bv);
      bv = static_cast<C>(buf[i]);  // as stored (matters for half types only)
      g = o.nesterov ? g + mom * bv : bv;
    }
    p[i] = static_cast<T>(pv + -lr * g);
  }
}

template <class T>
void adam_chunk(const OptimSlot& s, int64_t b, int64_t n, const OptimStep& o) {
  using C = compute_t<T>;
  T* p = static_cast<T*>(s.param) + b;
  const T* gp = static_cast<const T*>(s.grad) + b;
  T* m = static_cast<T*>(s.state1) + b;
  T* v = static_cast<T*>(s.state2) + b;
  const C wd = static_cast<C>(o.weight_decay), decay = static_cast<C>(1 - o.lr * o.weight_decay),
          b1 = static_cast<C>(o.beta1), b2 = static_cast<C>(o.beta2), k1 = static_cast<C>(1 - o.beta1),
          k2 = static_cast<C>(1 - o.beta2), eps = static_cast<C>(o.eps), step = static_cast<C>(o.step_size),
          sbc2 = static_cast<C>(o.sqrt_bc2);
  for (int64_t i = 0; i < n; ++i) {
    C pv = static_cast<C>(p[i]);
    C g = static_cast<C>(gp[i]);
    if (o.weight_decay != 0) {
      if (o.decoupled) pv = pv * decay;
      else g = g + wd * pv;
    }
    const C mv = b1 * static_cast<C>(m[i]) + k1 * g;
    const C vv = b2 * static_cast<C>(v[i]) + k2 * (g * g);
    m[i] = static_cast<T>(mv);
    v[i] = static_cast<T>(vv);
    const C denom = std::sqrt(static_cast<C>(v[i])) / sbc2 + eps;
    p[i] = static_cast<T>(pv + -step * (static_cast<C>(m[i]) / denom));
  }
}

// OpenMP pragmas cannot sit inside the dispatch macro's argument: the typed loops are functions of their own.
template <class T>
void optim_step_typed(const std::vector<OptimSlot>& slots, const std::vector<Chunk>& chunks, const OptimStep& o) {
  const int64_t n = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t c = 0; c < n; ++c) {
    const Chunk& k = chunks[c];
    if (o.kind == OptimKind::SGD) sgd_chunk<T>(slots[k.slot], k.start, k.len, o);
    else adam_chunk<T>(slots[k.slot], k.start, k.len, o);
  }
}

template <class T>
void sq_sum_typed(const std::vector<GradSlot>& slots, const std::vector<Chunk>& chunks, std::vector<double>& partial) {
  const int64_t n = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t c = 0; c < n; ++c) {
    const Chunk& k = chunks[c];
    const T* g = static_cast<const T*>(slots[k.slot].data) + k.start;
    double acc = 0;
    for (int64_t i = 0; i < k.len; ++i) {
      const double x = static_cast<double>(static_cast<compute_t<T>>(g[i]));
      acc += x * x;
    }
    partial[c] = acc;
  }
}

template <class T>
void scale_typed(const std::vector<GradSlot>& slots, const std::vector<Chunk>& chunks, double coef) {
  using C = compute_t<T>;
  const C k = static_cast<C>(coef);
  const int64_t n = static_cast<int64_t>(chunks.size());
#pragma omp parallel for schedule(static) if (n > 1)
  for (int64_t c = 0; c < n; ++c) {
    T* g = static_cast<T*>(slots[chunks[c].slot].data) + chunks[c].start;
    for (int64_t i = 0; i < chunks[c].len; ++i) g[i] = static_cast<T>(static_cast<C>(g[i]) * k);
  }
}

void optim_step_cpu(int, DType dtype, const std::vector<OptimSlot>& slots, const OptimStep& o) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  FG_DISPATCH_FLOATING_TYPES(dtype, "optimizer step", [&]<class T>() { optim_step_typed<T>(slots, chunks, o); });
}

double grad_sq_sum_cpu(int, DType dtype, const std::vector<GradSlot>& slots) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  std::vector<double> partial(chunks.size(), 0.0);
  FG_DISPATCH_FLOATING_TYPES(dtype, "clip_grad_norm_", [&]<class T>() { sq_sum_typed<T>(slots, chunks, partial); });
  double total = 0;
  for (double x : partial) total += x;  // chunk order: independent of the thread count
  return total;
}

void grad_scale_cpu(int, DType dtype, const std::vector<GradSlot>& slots, double coef) {
  const std::vector<Chunk> chunks = chunks_of(slots);
  FG_DISPATCH_FLOATING_TYPES(dtype, "clip_grad_norm_", [&]<class T>() { scale_typed<T>(slots, chunks, coef); });
}

}  // namespace

FG_REGISTER_KERNEL(optim_step_stub, CPU, optim_step_cpu);
FG_REGISTER_KERNEL(grad_sq_sum_stub, CPU, grad_sq_sum_cpu);
FG_REGISTER_KERNEL(grad_scale_stub, CPU, grad_scale_cpu);

}  // namespace fg
