// CUDA kernels of the elementwise families (ops/elementwise.h), computing with the same scalar math as
// the CPU (ops/elementwise_math.h). Half types load to float, compute, and round back once per element.
#include "flexgrad/ops/cuda/elementwise_launch.cuh"
#include "flexgrad/ops/elementwise.h"
#include "flexgrad/ops/elementwise_math.h"

namespace fg::cuda {
namespace {

template <class D> struct UnaryF {
  UnaryOp op;
  __device__ D operator()(D x) const { return store_c<D>(math::unary<dc_t<D>>(op, load_c(x))); }
};

template <class D> struct PredicateF {  // LogicalNot / IsNan / IsInf -> bool
  UnaryOp op;
  __device__ bool operator()(D v) const {
    auto x = load_c(v);
    using C = decltype(x);
    if (op == UnaryOp::LogicalNot) return !(x != C(0));
    if constexpr (std::is_floating_point_v<C>) return op == UnaryOp::IsNan ? ::isnan(x) : ::isinf(x);
    else return false;
  }
};

template <class D> struct BinaryF {
  BinaryOp op;
  dc_t<D> alpha;
  __device__ D operator()(D a, D b) const { return store_c<D>(math::binary<dc_t<D>>(op, load_c(a), load_c(b), alpha)); }
};

// Integer division family: records a division by zero in *flag (the op then raises on the host).
template <class D> struct IntDivF {
  BinaryOp op;
  D alpha;
  int* flag;
  __device__ D operator()(D a, D b) const {
    if (b == 0) *flag = 1;
    return math::binary<D>(op, a, b, alpha);
  }
};

template <class D> struct CompareF {
  BinaryOp op;
  __device__ bool operator()(D a, D b) const { return math::compare<dc_t<D>>(op, load_c(a), load_c(b)); }
};

template <class D> struct WhereF {
  __device__ D operator()(bool c, D a, D b) const { return c ? a : b; }
};

template <class Out, class In> struct CastF {
  __device__ Out operator()(In v) const {
    if constexpr (std::is_same_v<Out, In>) {
      return v;
    } else if constexpr (std::is_same_v<Out, bool>) {
      auto x = load_c(v);
      return x != decltype(x)(0);
    } else if constexpr (std::is_same_v<In, bool>) {
      return store_c<Out>(static_cast<dc_t<Out>>(v ? 1 : 0));
    } else {
      return store_c<Out>(static_cast<dc_t<Out>>(load_c(v)));
    }
  }
};

template <class D> struct FillF {
  D value;
  __device__ D operator()() const { return value; }
};

void unary_kernel(const ElementwisePlan& p, UnaryOp op) {
  if (op == UnaryOp::LogicalNot || op == UnaryOp::IsNan || op == UnaryOp::IsInf) {
    dispatch_all(p.dtypes[1], unary_op_name(op), [&]<class D>() {
      launch_elementwise<1, bool, D>(p, PredicateF<D>{op});
    });
    return;
  }
  dispatch_all(p.dtypes[0], unary_op_name(op), [&]<class D>() { launch_elementwise<1, D, D>(p, UnaryF<D>{op}); });
}

void binary_kernel(const ElementwisePlan& p, BinaryOp op, double alpha) {
  if (math::is_comparison(op)) {
    dispatch_all(p.dtypes[1], binary_op_name(op), [&]<class D>() {
      launch_elementwise<2, bool, D, D>(p, CompareF<D>{op});
    });
    return;
  }
  dispatch_all(p.dtypes[0], binary_op_name(op), [&]<class D>() {
    if constexpr (std::is_integral_v<D> && !std::is_same_v<D, bool>) {
      if (op == BinaryOp::FloorDiv || op == BinaryOp::Remainder || op == BinaryOp::Div) {
        const int dev = device_of(p.data[0]);
        DeviceGuard g(dev);
        Workspace flag(sizeof(int), dev);
        FG_CUDA_CHECK(cudaMemsetAsync(flag.get(), 0, sizeof(int), stream(dev)));
        launch_elementwise<2, D, D, D>(p, IntDivF<D>{op, static_cast<D>(alpha), flag.as<int>()});
        int seen = 0;
        FG_CUDA_CHECK(cudaMemcpyAsync(&seen, flag.get(), sizeof(int), cudaMemcpyDeviceToHost, stream(dev)));
        FG_CUDA_CHECK(cudaStreamSynchronize(stream(dev)));
        FG_CHECK(!seen, ValueError, "{}: ZeroDivisionError (integer division by zero)", binary_op_name(op));
        return;
      }
    }
    launch_elementwise<2, D, D, D>(p, BinaryF<D>{op, static_cast<dc_t<D>>(alpha)});
  });
}

void where_kernel(const ElementwisePlan& p) {
  dispatch_all(p.dtypes[0], "where", [&]<class D>() { launch_elementwise<3, D, bool, D, D>(p, WhereF<D>{}); });
}

void copy_kernel(const ElementwisePlan& p) {
  if (p.numel == 0) return;
  if (p.dtypes[0] == p.dtypes[1] && p.is_contiguous(0) && p.is_contiguous(1)) {
    const int dev = device_of(p.data[0]);
    DeviceGuard g(dev);
    FG_CUDA_CHECK(cudaMemcpyAsync(p.data[0], p.data[1], static_cast<size_t>(p.numel) * element_size(p.dtypes[0]),
                                  cudaMemcpyDeviceToDevice, stream(dev)));
    return;
  }
  dispatch_all(p.dtypes[0], "copy", [&]<class O>() {
    dispatch_all(p.dtypes[1], "copy", [&]<class I>() { launch_elementwise<1, O, I>(p, CastF<O, I>{}); });
  });
}

void fill_kernel(const ElementwisePlan& p, Scalar value) {
  dispatch_all(p.dtypes[0], "fill", [&]<class D>() {
    const host_t<D> v = value.to<host_t<D>>();
    D dv;
    static_assert(sizeof(dv) == sizeof(v));
    std::memcpy(&dv, &v, sizeof(v));
    launch_elementwise<0, D>(p, FillF<D>{dv});
  });
}

}  // namespace

FG_REGISTER_KERNEL(unary_stub, CUDA, &unary_kernel);
FG_REGISTER_KERNEL(binary_stub, CUDA, &binary_kernel);
FG_REGISTER_KERNEL(where_stub, CUDA, &where_kernel);
FG_REGISTER_KERNEL(copy_stub, CUDA, &copy_kernel);
FG_REGISTER_KERNEL(fill_stub, CUDA, &fill_kernel);

}  // namespace fg::cuda
