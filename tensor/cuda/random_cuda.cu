// CUDA kernel of random_fill_stub (tensor/random_kernels.h): each thread computes the Philox words of its
// elements' counters and maps them exactly as the CPU kernel does (tensor/random.h), so rand, randint
// and bernoulli are bit-identical to the CPU for the same generator state. randn evaluates the same
// double-precision Box-Muller formula with CUDA's log/cos/sqrt (within an ulp or two of libm in double;
// equal after rounding to the stored dtype in all but rare ties).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

#include "flexgrad/tensor/cuda/cuda_check.h"
#include "flexgrad/tensor/half.h"
#include "flexgrad/tensor/philox.h"
#include "flexgrad/tensor/random_kernels.h"

namespace fg::cuda {
namespace {

template <class T> struct dev { using type = T; };
template <> struct dev<Half> { using type = __half; };
template <> struct dev<BFloat16> { using type = __nv_bfloat16; };

// Rounds a double to D as the CPU's store<T>: through the compute type (float for half types), to nearest even.
template <class D> __device__ __forceinline__ D store_d(double v) {
  if constexpr (std::is_same_v<D, bool>) return v != 0.0;
  else if constexpr (std::is_same_v<D, __half>) return __float2half_rn(__double2float_rn(v));
  else if constexpr (std::is_same_v<D, __nv_bfloat16>) return __float2bfloat16_rn(__double2float_rn(v));
  else return static_cast<D>(v);
}

template <class D>
__global__ void random_fill_kernel(D* __restrict__ out, RandomFill f) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < f.n; i += stride) {
    uint32_t w[4];
    Philox4x32::generate(f.seed, f.base + static_cast<uint64_t>(i), w);
    D v;
    switch (f.kind) {
      case RandomKind::Uniform:
        if constexpr (std::is_same_v<D, double>) v = Philox4x32::to_double(w[0], w[1]);
        else if constexpr (std::is_same_v<D, float>) v = Philox4x32::to_float(w[0]);
        else if constexpr (std::is_same_v<D, __half>) v = __float2half_rn(static_cast<float>(w[0] >> 21) * (1.0f / 2048.0f));
        else if constexpr (std::is_same_v<D, __nv_bfloat16>) v = __float2bfloat16_rn(static_cast<float>(w[0] >> 24) * (1.0f / 256.0f));
        else v = D{};
        break;
      case RandomKind::Normal: {
        const double u1 = 1.0 - Philox4x32::to_double(w[0], w[1]);
        const double u2 = Philox4x32::to_double(w[2], w[3]);
        // Plain IEEE multiplies/adds (no FMA contraction) so the formula is evaluated as on the CPU.
        const double r = __dsqrt_rn(__dmul_rn(-2.0, ::log(u1)));
        v = store_d<D>(__dmul_rn(r, ::cos(__dmul_rn(2.0 * 3.141592653589793, u2))));
        break;
      }
      case RandomKind::Int: {
        const uint64_t wv = (static_cast<uint64_t>(w[0]) << 32) | w[1];
        const int64_t x = static_cast<int64_t>(static_cast<uint64_t>(f.low) + wv % f.range);
        if constexpr (std::is_same_v<D, bool>) v = x != 0;
        else if constexpr (std::is_integral_v<D>) v = static_cast<D>(x);
        else v = store_d<D>(static_cast<double>(x));
        break;
      }
      case RandomKind::Bernoulli:
        v = store_d<D>(Philox4x32::to_double(w[0], w[1]) < f.p ? 1.0 : 0.0);
        break;
    }
    out[i] = v;
  }
}

void random_fill_cuda(void* out, const RandomFill& f) {
  const int dev_index = device_of(out);
  DeviceGuard g(dev_index);
  cudaStream_t s = stream(dev_index);
  constexpr int threads = 256;
  int64_t blocks = (f.n + threads - 1) / threads;
  const int64_t cap = static_cast<int64_t>(num_sms(dev_index)) * 16;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  auto launch = [&]<class T>() {
    using D = typename dev<T>::type;
    random_fill_kernel<D><<<static_cast<unsigned>(blocks), threads, 0, s>>>(static_cast<D*>(out), f);
  };
  FG_DISPATCH_ALL_TYPES(f.dtype, "random fill", launch);
  FG_CUDA_CHECK_LAUNCH();
}

}  // namespace

FG_REGISTER_KERNEL(random_fill_stub, CUDA, random_fill_cuda);

}  // namespace fg::cuda
