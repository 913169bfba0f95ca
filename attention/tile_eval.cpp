// Tile interpreter for ModPrograms (see tile_eval.h for the storage scheme).
//
// Built without trapping math: flexgrad never reads floating-point exception flags, and assuming no
// traps lets GCC if-convert the selects of vec_math.h (NaN/overflow handling) and vectorise the
// exp / tanh / sigmoid loops. Results are unchanged.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "flexgrad/attention/tile_eval.h"

#include <cmath>
#include <cstdlib>
#include <new>

#include "flexgrad/attention/op_semantics.h"
#include "flexgrad/tensor/vec_math.h"

namespace fg {

namespace {

// o[i*nj + j] = f(a(i,j)); operands broadcast along dims where their stride is 0.
template <class O, class A, class F>
inline void map1(O* __restrict o, int64_t ni, int64_t nj, const A* a, int64_t ars, int64_t acs, F f) {
  for (int64_t i = 0; i < ni; ++i) {
    O* __restrict orow = o + i * nj;
    const A* ar = a + i * ars;
    if (acs) {
      for (int64_t j = 0; j < nj; ++j) orow[j] = f(ar[j]);
    } else {
      const O v = f(ar[0]);
      for (int64_t j = 0; j < nj; ++j) orow[j] = v;
    }
  }
}

template <class O, class A, class B, class F>
inline void map2(O* __restrict o, int64_t ni, int64_t nj, const A* a, int64_t ars, int64_t acs, const B* b,
                 int64_t brs, int64_t bcs, F f) {
  for (int64_t i = 0; i < ni; ++i) {
    O* __restrict orow = o + i * nj;
    const A* ar = a + i * ars;
    const B* br = b + i * brs;
    if (acs && bcs) {
      for (int64_t j = 0; j < nj; ++j) orow[j] = f(ar[j], br[j]);
    } else if (acs) {
      const B bv = br[0];
      for (int64_t j = 0; j < nj; ++j) orow[j] = f(ar[j], bv);
    } else if (bcs) {
      const A av = ar[0];
      for (int64_t j = 0; j < nj; ++j) orow[j] = f(av, br[j]);
    } else {
      const O v = f(ar[0], br[0]);
      for (int64_t j = 0; j < nj; ++j) orow[j] = v;
    }
  }
}

template <class K, class F>
void run_binary_arith(ExprOp op, K* o, int64_t ni, int64_t nj, const K* a, int64_t ars, int64_t acs, const K* b,
                      int64_t brs, int64_t bcs) {
  constexpr bool fl = std::is_floating_point_v<K>;
  switch (op) {
    // Element functions from the op table (attention/op_semantics.h); ints wrap on overflow.
    case ExprOp::Add:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(x + y); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::wrap_add(x, y); });
      break;
    case ExprOp::Sub:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(x - y); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::wrap_sub(x, y); });
      break;
    case ExprOp::Mul:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(x * y); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::wrap_mul(x, y); });
      break;
    case ExprOp::Div:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(x / y); });
      break;
    case ExprOp::Min: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::min_f(x, y); }); break;
    case ExprOp::Max: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::max_f(x, y); }); break;
    case ExprOp::FloorDiv:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::floordiv_f(x, y); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(py_floordiv(x, y)); });
      break;
    case ExprOp::Mod:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return sem::mod_f(x, y); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(py_mod(x, y)); });
      break;
    case ExprOp::Pow:
      if constexpr (fl) map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(std::pow(x, y)); });
      else map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return K(int_pow(x, y)); });
      break;
    default: FG_FAIL(ValueError, "TileEvaluator: {} is not arithmetic", expr_op_name(op));
  }
}

template <class K>
void run_compare(ExprOp op, uint8_t* o, int64_t ni, int64_t nj, const K* a, int64_t ars, int64_t acs, const K* b,
                 int64_t brs, int64_t bcs) {
  switch (op) {
    case ExprOp::Eq: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x == y); }); break;
    case ExprOp::Ne: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x != y); }); break;
    case ExprOp::Lt: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x < y); }); break;
    case ExprOp::Le: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x <= y); }); break;
    case ExprOp::Gt: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x > y); }); break;
    case ExprOp::Ge: map2(o, ni, nj, a, ars, acs, b, brs, bcs, [](K x, K y) { return uint8_t(x >= y); }); break;
    default: FG_FAIL(ValueError, "TileEvaluator: {} is not a comparison", expr_op_name(op));
  }
}

template <class O, class A>
void run_cast(O* o, int64_t ni, int64_t nj, const A* a, int64_t ars, int64_t acs, bool to_bool) {
  if (to_bool) map1(o, ni, nj, a, ars, acs, [](A x) { return O(x != A(0)); });
  else if constexpr (std::is_floating_point_v<A> && std::is_integral_v<O>)
    map1(o, ni, nj, a, ars, acs, [](A x) { return sem::to_int(x); });  // saturating, NaN -> 0
  else map1(o, ni, nj, a, ars, acs, [](A x) { return static_cast<O>(x); });
}

}  // namespace

template <class T>
void TileEvaluator<T>::Free::operator()(void* p) const {
  ::operator delete(p, std::align_val_t(64));
}

template <class T>
TileEvaluator<T>::TileEvaluator(ModProgram program) {
  reset(std::move(program));
}

template <class T>
void TileEvaluator<T>::reset(ModProgram program) {
  for (const CaptureRef& c : program.captures())
    FG_CHECK(c.tensor.is_cpu(), DeviceError, "TileEvaluator: captured tensor '{}' must be on the CPU", c.name);
  program_ = std::move(program);
  slots_.assign(program_.size(), Slot{});
  // Keep the buffers when every instruction that needs one has one; else the next run allocates.
  bool fits = program_.size() <= bufs_.size();
  for (size_t i = 0; fits && i < program_.size(); ++i) fits = bufs_[i] || program_.instrs()[i].op == ExprOp::Score;
  if (!fits) {
    owned_.clear();
    bufs_.assign(program_.size(), nullptr);
    capacity_ = 0;
  }
}

template <class T>
void TileEvaluator<T>::release() {
  program_ = ModProgram();
  slots_.clear();
}

template <class T>
void TileEvaluator<T>::reserve(int64_t elems) {
  if (elems <= capacity_) return;
  capacity_ = std::max<int64_t>(elems, 2 * capacity_);
  owned_.clear();
  bufs_.assign(program_.size(), nullptr);
  for (size_t i = 0; i < bufs_.size(); ++i) {
    const Instr& in = program_.instrs()[i];
    if (in.op == ExprOp::Score) {
      bufs_[i] = nullptr;
      continue;
    }
    void* p = ::operator new(static_cast<size_t>(capacity_) * 8, std::align_val_t(64));
    owned_.emplace_back(p);
    bufs_[i] = p;
  }
}

template <class T>
void TileEvaluator<T>::run(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, const T* score,
                           int64_t ld_score) {
  FG_CHECK(nq >= 0 && nkv >= 0, ValueError, "TileEvaluator::run: negative tile size {} x {}", nq, nkv);
  FG_CHECK(score != nullptr || !program_.uses(kUsesScore), ValueError,
           "TileEvaluator::run: the program uses the score but no score tile was given");
  if (ld_score < 0) ld_score = nkv;
  nq_ = nq;
  nkv_ = nkv;
  reserve(std::max<int64_t>(1, std::max(nq * nkv, std::max(nq, nkv))));
  const auto& ins = program_.instrs();
#define FG_ARG(U, k) static_cast<const U*>(slots_[in.args[k]].ptr), slots_[in.args[k]].rs, slots_[in.args[k]].cs
  for (size_t id = 0; id < ins.size(); ++id) {
    const Instr& in = ins[id];
    const bool vq = (in.deps & (kUsesQ | kUsesScore)) != 0;
    const bool vkv = (in.deps & (kUsesKV | kUsesScore)) != 0;
    const int64_t ni = vq ? nq : 1, nj = vkv ? nkv : 1;
    Slot& s = slots_[id];
    void* out = bufs_[id];
    s.ptr = out;
    s.rs = vq ? nj : 0;
    s.cs = vkv ? 1 : 0;
    T* of = static_cast<T*>(out);
    int64_t* oi = static_cast<int64_t*>(out);
    uint8_t* ob = static_cast<uint8_t*>(out);
    const ValueKind k0 = in.args.empty() ? in.kind : ins[in.args[in.op == ExprOp::Where ? 1 : 0]].kind;
    switch (in.op) {
      case ExprOp::Const:
        if (in.kind == ValueKind::Float) of[0] = static_cast<T>(in.value);
        else if (in.kind == ValueKind::Int) oi[0] = in.ivalue;
        else ob[0] = static_cast<uint8_t>(in.ivalue != 0);
        break;
      case ExprOp::Score:
        s.ptr = score;
        s.rs = ld_score;
        s.cs = 1;
        break;
      case ExprOp::Batch: oi[0] = b; break;
      case ExprOp::Head: oi[0] = h; break;
      case ExprOp::QIdx: for (int64_t i = 0; i < nq; ++i) oi[i] = q0 + i; break;
      case ExprOp::KVIdx: for (int64_t j = 0; j < nkv; ++j) oi[j] = kv0 + j; break;
      case ExprOp::Index: {
        const CaptureRef& c = program_.captures()[in.capture];
        const Tensor& t = c.tensor;
        const int64_t nd = t.dim();
        const Shape& sizes = t.sizes();
        const Shape& strides = t.strides();
        const void* base = t.data_ptr();
        auto gather = [&](const auto* src, auto* dst) {
          using D = std::remove_pointer_t<decltype(dst)>;
          for (int64_t i = 0; i < ni; ++i)
            for (int64_t j = 0; j < nj; ++j) {
              int64_t off = 0;
              for (int64_t d = 0; d < nd; ++d) {
                const Slot& is = slots_[in.args[d]];
                int64_t v = static_cast<const int64_t*>(is.ptr)[i * is.rs + j * is.cs];
                if (static_cast<uint64_t>(v) >= static_cast<uint64_t>(sizes[d])) {  // Python rules: wrap or raise
                  v = wrap_capture_index(c, d, v);
                }
                off += v * strides[d];
              }
              dst[i * nj + j] = static_cast<D>(src[off]);
            }
        };
        switch (t.dtype()) {
          case DType::Float32: gather(static_cast<const float*>(base), of); break;
          case DType::Float64: gather(static_cast<const double*>(base), of); break;
          case DType::Int32: gather(static_cast<const int32_t*>(base), oi); break;
          case DType::Int64: gather(static_cast<const int64_t*>(base), oi); break;
          case DType::Bool: gather(static_cast<const bool*>(base), ob); break;
          default: FG_FAIL(DTypeError, "TileEvaluator: captured tensor '{}' has unsupported dtype {}", c.name, t.dtype());
        }
        break;
      }
      case ExprOp::Cast: {
        const bool tb = in.kind == ValueKind::Bool;
        if (in.kind == ValueKind::Float) {
          if (k0 == ValueKind::Int) run_cast(of, ni, nj, FG_ARG(int64_t, 0), false);
          else run_cast(of, ni, nj, FG_ARG(uint8_t, 0), false);
        } else if (in.kind == ValueKind::Int) {
          if (k0 == ValueKind::Float) run_cast(oi, ni, nj, FG_ARG(T, 0), false);
          else run_cast(oi, ni, nj, FG_ARG(uint8_t, 0), false);
        } else {
          if (k0 == ValueKind::Float) run_cast(ob, ni, nj, FG_ARG(T, 0), tb);
          else run_cast(ob, ni, nj, FG_ARG(int64_t, 0), tb);
        }
        break;
      }
      case ExprOp::Neg:
        if (in.kind == ValueKind::Float) map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return -x; });
        else map1(oi, ni, nj, FG_ARG(int64_t, 0), [](int64_t x) { return sem::wrap_neg(x); });
        break;
      case ExprOp::Abs:
        if (in.kind == ValueKind::Float) map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::abs(x); });
        else map1(oi, ni, nj, FG_ARG(int64_t, 0), [](int64_t x) { return sem::wrap_abs(x); });
        break;
      case ExprOp::Not: map1(ob, ni, nj, FG_ARG(uint8_t, 0), [](uint8_t x) { return uint8_t(x ^ 1); }); break;
      case ExprOp::Exp: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return vec::exp(x); }); break;
      case ExprOp::Exp2: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return vec::exp2(x); }); break;
      case ExprOp::Log: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::log(x); }); break;
      case ExprOp::Log2: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::log2(x); }); break;
      case ExprOp::Sqrt: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::sqrt(x); }); break;
      case ExprOp::Rsqrt: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return T(1) / std::sqrt(x); }); break;
      case ExprOp::Sin: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::sin(x); }); break;
      case ExprOp::Cos: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::cos(x); }); break;
      case ExprOp::Tan: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::tan(x); }); break;
      case ExprOp::Tanh: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return vec::tanh(x); }); break;
      case ExprOp::Sigmoid: map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return vec::sigmoid(x); }); break;
      case ExprOp::Floor:
      case ExprOp::Ceil:
        if (in.kind == ValueKind::Int) map1(oi, ni, nj, FG_ARG(int64_t, 0), [](int64_t x) { return x; });
        else if (in.op == ExprOp::Floor) map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::floor(x); });
        else map1(of, ni, nj, FG_ARG(T, 0), [](T x) { return std::ceil(x); });
        break;
      case ExprOp::Add: case ExprOp::Sub: case ExprOp::Mul: case ExprOp::Div: case ExprOp::FloorDiv:
      case ExprOp::Mod: case ExprOp::Pow: case ExprOp::Min: case ExprOp::Max:
        if (in.kind == ValueKind::Float) run_binary_arith<T, void>(in.op, of, ni, nj, FG_ARG(T, 0), FG_ARG(T, 1));
        else run_binary_arith<int64_t, void>(in.op, oi, ni, nj, FG_ARG(int64_t, 0), FG_ARG(int64_t, 1));
        break;
      case ExprOp::Eq: case ExprOp::Ne: case ExprOp::Lt: case ExprOp::Le: case ExprOp::Gt: case ExprOp::Ge:
        if (k0 == ValueKind::Float) run_compare<T>(in.op, ob, ni, nj, FG_ARG(T, 0), FG_ARG(T, 1));
        else if (k0 == ValueKind::Int) run_compare<int64_t>(in.op, ob, ni, nj, FG_ARG(int64_t, 0), FG_ARG(int64_t, 1));
        else run_compare<uint8_t>(in.op, ob, ni, nj, FG_ARG(uint8_t, 0), FG_ARG(uint8_t, 1));
        break;
      case ExprOp::And:
        map2(ob, ni, nj, FG_ARG(uint8_t, 0), FG_ARG(uint8_t, 1), [](uint8_t x, uint8_t y) { return uint8_t(x & y); });
        break;
      case ExprOp::Or:
        map2(ob, ni, nj, FG_ARG(uint8_t, 0), FG_ARG(uint8_t, 1), [](uint8_t x, uint8_t y) { return uint8_t(x | y); });
        break;
      case ExprOp::Where: {
        const Slot &c = slots_[in.args[0]], &x = slots_[in.args[1]], &y = slots_[in.args[2]];
        auto sel = [&](auto* dst) {
          using D = std::remove_pointer_t<decltype(dst)>;
          const uint8_t* cp = static_cast<const uint8_t*>(c.ptr);
          const D* xp = static_cast<const D*>(x.ptr);
          const D* yp = static_cast<const D*>(y.ptr);
          for (int64_t i = 0; i < ni; ++i) {
            const uint8_t* cr = cp + i * c.rs;
            const D* xr = xp + i * x.rs;
            const D* yr = yp + i * y.rs;
            D* orow = dst + i * nj;
            for (int64_t j = 0; j < nj; ++j) orow[j] = cr[j * c.cs] ? xr[j * x.cs] : yr[j * y.cs];
          }
        };
        if (in.kind == ValueKind::Float) sel(of);
        else if (in.kind == ValueKind::Int) sel(oi);
        else sel(ob);
        break;
      }
    }
  }
#undef FG_ARG
}

template <class T>
TileValue TileEvaluator<T>::output(size_t i) const {
  FG_CHECK(i < program_.outputs().size(), IndexError, "TileEvaluator::output: output {} of {}", i,
           program_.outputs().size());
  const int32_t id = program_.outputs()[i];
  const Slot& s = slots_[id];
  return TileValue{s.ptr, s.rs, s.cs, program_.instrs()[id].kind};
}

template <class T>
void TileEvaluator<T>::score_tile(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv,
                                  const T* score, T* out, int64_t ld_score, int64_t ld_out) {
  run(b, h, q0, nq, kv0, nkv, score, ld_score);
  copy_output(0, out, ld_out);
}

template <class T>
void TileEvaluator<T>::mask_tile(int64_t b, int64_t h, int64_t q0, int64_t nq, int64_t kv0, int64_t nkv, uint8_t* out,
                                 int64_t ld_out) {
  FG_CHECK(program_.instrs()[program_.output()].kind == ValueKind::Bool, ValueError,
           "TileEvaluator::mask_tile: the program's output is {}, not bool",
           value_kind_name(program_.instrs()[program_.output()].kind));
  run(b, h, q0, nq, kv0, nkv);
  copy_output(0, out, ld_out);
}

template <class T>
int64_t TileEvaluator<T>::count_true(size_t i) const {
  const TileValue v = output(i);
  FG_CHECK(v.kind == ValueKind::Bool, ValueError, "TileEvaluator::count_true: output {} is {}, not bool", i,
           value_kind_name(v.kind));
  const uint8_t* p = v.as<uint8_t>();
  if (v.row_stride == 0 && v.col_stride == 0) return p[0] ? nq_ * nkv_ : 0;
  int64_t n = 0;
  for (int64_t r = 0; r < nq_; ++r) {
    const uint8_t* row = p + r * v.row_stride;
    int64_t rn = 0;
    if (v.col_stride) {
      for (int64_t c = 0; c < nkv_; ++c) rn += row[c];
    } else {
      rn = row[0] ? nkv_ : 0;
    }
    n += rn;
  }
  return n;
}

template class TileEvaluator<float>;
template class TileEvaluator<double>;

}  // namespace fg
