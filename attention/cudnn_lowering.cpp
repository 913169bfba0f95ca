// lower_to_cudnn: pattern matching on the traced programs (cudnn_lowering.h says what lowers).
#include "flexgrad/attention/cudnn_lowering.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "flexgrad/attention/kv_band.h"
#include "flexgrad/attention/mod_grad.h"

namespace fg {

namespace {

constexpr int64_t kNoBound = std::numeric_limits<int64_t>::max();

// The band: lo <= q_idx - kv_idx <= hi (kNoBound / -kNoBound when open).
struct Band {
  int64_t lo = -kNoBound, hi = kNoBound;
};

// cuDNN's diagonal band from the mask's kv interval per row (kv_band.h): every bound must be kv >= q + c or
// kv <= q + c (q's coefficient 1), and no condition may restrict rows by q_idx alone.
std::optional<Band> diagonal_band(const ModProgram& mask, std::string& why) {
  std::optional<KvBand> kb = kv_band(&mask, &why);
  if (!kb) return std::nullopt;
  if (kb->never) {
    why = "mask_mod: a constant false mask (no key is allowed)";
    return std::nullopt;
  }
  Band b;
  for (const AffineBound& c : kb->row_conditions) {
    if (c.q_coef == 0 && c.offset >= 0) continue;  // always true
    why = fmt::format("mask_mod: {} keeps rows by q_idx alone (not a diagonal band)", mask.to_string());
    if (c.q_coef == 0) why = "mask_mod: a constant false mask (no key is allowed)";
    return std::nullopt;
  }
  auto diagonal = [&](const AffineBound& c) {
    if (c.q_coef == 1) return true;
    why = fmt::format("mask_mod: {} compares q_idx and kv_idx with coefficients other than q_idx - kv_idx (not a "
                      "diagonal band)", mask.to_string());
    return false;
  };
  for (const AffineBound& c : kb->lower) {  // kv >= q + o  <=>  q - kv <= -o
    if (!diagonal(c)) return std::nullopt;
    b.hi = std::min(b.hi, -c.offset);
  }
  for (const AffineBound& c : kb->upper) {  // kv <= q + o  <=>  q - kv >= -o
    if (!diagonal(c)) return std::nullopt;
    b.lo = std::max(b.lo, -c.offset);
  }
  return b;
}

// Does the BlockMask agree with the band block by block? Empty blocks must hold no allowed entry and full
// blocks no masked one. Returns the first disagreement.
std::string check_blocks_uncached(const BlockMask& bm, const Band& band, int64_t Lq, int64_t Lkv) {
  const Tensor kinds = bm.block_kinds().to(kCPU).contiguous();
  const int32_t* k = kinds.data<int32_t>();
  const int64_t bq = bm.block_size().q, bkv = bm.block_size().kv;
  const int64_t nQ = bm.num_q_blocks(), nKV = bm.num_kv_blocks();
  for (int64_t bh = 0; bh < bm.batch() * bm.heads(); ++bh) {
    for (int64_t i = 0; i < nQ; ++i) {
      for (int64_t j = 0; j < nKV; ++j) {
        const int32_t kind = k[(bh * nQ + i) * nKV + j];
        const int64_t q0 = i * bq, q1 = std::min((i + 1) * bq, Lq) - 1;
        const int64_t kv0 = j * bkv, kv1 = std::min((j + 1) * bkv, Lkv) - 1;
        if (q0 > q1 || kv0 > kv1) continue;  // wholly past the sequence: nothing to agree on
        const int64_t dmin = q0 - kv1, dmax = q1 - kv0;
        const bool any = std::max(dmin, band.lo) <= std::min(dmax, band.hi);
        const bool all = dmin >= band.lo && dmax <= band.hi;
        if (kind == 0 && any) {
          return fmt::format("the BlockMask skips block (b*h {}, q block {}, kv block {}) where the mask_mod allows "
                             "keys: flex_attention's mask is sparser than the band", bh, i, j);
        }
        if (kind == 2 && !all) {
          return fmt::format("the BlockMask marks block (b*h {}, q block {}, kv block {}) full where the mask_mod "
                             "masks keys: flex_attention's mask is denser than the band", bh, i, j);
        }
      }
    }
  }
  return {};
}

// check_blocks_uncached reads the block lists back to the host (a device synchronisation on a GPU mask): a
// training or benchmark loop passes the same BlockMask every call, so the answer is kept per mask. The key holds
// the lists' tensors (a mask's lists cannot change: BlockMask::check_unchanged), which keeps their addresses from
// being reused by another mask while the entry lives.
std::string check_blocks(const BlockMask& bm, const Band& band, int64_t Lq, int64_t Lkv) {
  struct Entry {
    Tensor num, full_num;
    int64_t lo, hi, lq, lkv;
    std::string answer;
  };
  static std::mutex mu;
  static auto* cache = new std::vector<Entry>();  // never destroyed: its tensors may live on a GPU (see all_full)
  const Tensor& num = bm.kv_num_blocks();
  const Tensor& full_num = bm.full_kv_num_blocks();
  auto same = [&](const Entry& e) {
    return e.num.data_ptr() == num.data_ptr() && e.full_num.defined() == full_num.defined() &&
           (!full_num.defined() || e.full_num.data_ptr() == full_num.data_ptr()) && e.lo == band.lo &&
           e.hi == band.hi && e.lq == Lq && e.lkv == Lkv;
  };
  {
    std::lock_guard lock(mu);
    for (const Entry& e : *cache) if (same(e)) return e.answer;
  }
  std::string answer = check_blocks_uncached(bm, band, Lq, Lkv);
  std::lock_guard lock(mu);
  if (cache->size() >= 32) cache->erase(cache->begin());
  cache->push_back(Entry{num, full_num, band.lo, band.hi, Lq, Lkv, answer});
  return answer;
}

const Instr& strip_float_cast(const ModProgram& p, int32_t& id) {
  while (p.instrs()[id].op == ExprOp::Cast && p.instrs()[id].kind == ValueKind::Float) id = p.instrs()[id].args[0];
  return p.instrs()[id];
}

int role_of(ExprOp op) {
  switch (op) {
    case ExprOp::Batch: return 0;
    case ExprOp::Head: return 1;
    case ExprOp::QIdx: return 2;
    case ExprOp::KVIdx: return 3;
    default: return -1;
  }
}

// score + f: the bias f as a CudnnSdpaSpec field, or the reason it does not lower.
std::string lower_bias(const ModProgram& p, int32_t f, const CudnnLoweringInput& in, CudnnSdpaSpec& s) {
  static const char* kRole[4] = {"b", "h", "q_idx", "kv_idx"};
  const int64_t extent[4] = {in.B, in.Hq, in.Lq, in.Lkv};
  int32_t id = f;
  const Instr& x = strip_float_cast(p, id);
  if (x.op == ExprOp::Index) {
    const CaptureRef& c = p.captures()[x.capture];
    if (x.kind != ValueKind::Float || !(c.tensor.dtype() == kFloat32 || c.tensor.dtype() == kFloat64 ||
                                        c.tensor.dtype() == kBFloat16 || c.tensor.dtype() == kFloat16)) {
      return fmt::format("score_mod: the bias reads captured tensor '{}' of dtype {} (cuDNN adds a float bias)",
                         c.name, c.tensor.dtype());
    }
    int last = -1;
    for (size_t d = 0; d < x.args.size(); ++d) {
      const int r = role_of(p.instrs()[x.args[d]].op);
      if (r < 0 || r <= last) {
        return fmt::format("score_mod: captured tensor '{}' is indexed at dim {} by something other than b, h, "
                           "q_idx, kv_idx in that order (formula: {})", c.name, d, p.to_string());
      }
      if (c.tensor.size(static_cast<int64_t>(d)) < extent[r]) {
        return fmt::format("score_mod: captured tensor '{}' has {} entries in dim {} (indexed by {}) but {} are "
                           "read", c.name, c.tensor.size(static_cast<int64_t>(d)), d, kRole[r], extent[r]);
      }
      s.bias_dim[r] = static_cast<int>(d);
      last = r;
    }
    s.bias = CudnnSdpaSpec::Bias::Tensor;
    s.bias_capture = x.capture;
    s.bias_learnable = c.tensor.requires_grad();
    return {};
  }
  if (x.op == ExprOp::Mul) {
    // slope(h) * (kv_idx - q_idx), either operand order, either sign of the difference.
    for (int side = 0; side < 2; ++side) {
      int32_t diff = x.args[side];
      const Instr& dd = strip_float_cast(p, diff);
      const int32_t slope = x.args[1 - side];
      if (dd.op != ExprOp::Sub || dd.kind != ValueKind::Int) continue;
      const ExprOp a = p.instrs()[dd.args[0]].op, b = p.instrs()[dd.args[1]].op;
      const bool kv_minus_q = a == ExprOp::KVIdx && b == ExprOp::QIdx, q_minus_kv = a == ExprOp::QIdx && b == ExprOp::KVIdx;
      if (!kv_minus_q && !q_minus_kv) continue;
      if ((p.instrs()[slope].deps & ~kUsesHead) != 0) {
        return fmt::format("score_mod: the ALiBi slope multiplying the distance depends on more than h (formula: {})",
                           p.to_string());
      }
      int32_t sid = slope;
      const Instr& sl = strip_float_cast(p, sid);
      if (sl.op == ExprOp::Index && kv_minus_q && sl.args.size() == 1 && sl.kind == ValueKind::Float) {
        const CaptureRef& c = p.captures()[sl.capture];
        if (c.tensor.size(0) < in.Hq) {
          return fmt::format("score_mod: ALiBi slopes '{}' have {} entries but h reads {}", c.name, c.tensor.size(0), in.Hq);
        }
        if (c.tensor.requires_grad()) {
          return fmt::format("score_mod: the ALiBi slopes '{}' require grad (cuDNN's graph gives no slope gradient)",
                             c.name);
        }
        s.bias = CudnnSdpaSpec::Bias::Alibi;
        s.alibi_capture = sl.capture;
        return {};
      }
      // Any other slope of h alone: the program at (b 0, h, q 0, kv 1, score 0) is slope(h) * (kv - q) = the slope
      // of (kv_idx - q_idx). Captures read there are read on the host: only CPU captures.
      for (const CaptureRef& c : p.captures()) {
        if (!c.tensor.device().is_cpu()) {
          return fmt::format("score_mod: the ALiBi slope reads captured tensor '{}' in a form other than '{}'[h] "
                             "on {} (the slopes would be read back per call)", c.name, c.name, c.tensor.device());
        }
        if (c.tensor.requires_grad()) {
          return fmt::format("score_mod: the ALiBi slope reads '{}', which requires grad (cuDNN's graph gives no "
                             "slope gradient)", c.name);
        }
      }
      s.bias = CudnnSdpaSpec::Bias::Alibi;
      s.alibi_slopes.resize(static_cast<size_t>(in.Hq));
      for (int64_t h = 0; h < in.Hq; ++h) s.alibi_slopes[static_cast<size_t>(h)] = p.evaluate(0, h, 0, 1, 0.0);
      return {};
    }
  }
  return fmt::format("score_mod: {} adds a term that is neither a captured tensor indexed by (b, h, q_idx, kv_idx) "
                     "in order nor slope(h) * (kv_idx - q_idx)", p.to_string());
}

// Whether d score_mod / d score (output 1 of `vd`) stays finite when the score is +-inf, for any indices: cuDNN's
// engines evaluate the backward chain on padding past Lq / Lkv too, where the scores they compute are infinite and dS
// is 0, and 0 * inf is NaN (cuDNN 9.19 builds no engine for a select in that chain that would mask it). Sound and
// simple: a score-dependent value is "linear" (the score scaled by a finite nonzero constant or shifted by a finite
// value: +-inf stays +-inf) until it goes through tanh or sigmoid, after which it is "bounded" and may be combined by
// + - * min max abs where() with bounded or index-only finite values; index-only floats are finite when built from
// constants and bounded ints by + - neg abs min max where(), products with a constant, casts and tanh / sigmoid /
// sin / cos. Returns why not (empty when the derivative is safe).
std::string derivative_unsafe_on_infinite_scores(const ModProgram& vd) {
  enum class Cls : uint8_t { Finite, Linear, Bounded, Unsafe };
  const auto& ins = vd.instrs();
  std::vector<Cls> cls(ins.size(), Cls::Unsafe);
  for (size_t i = 0; i < ins.size(); ++i) {
    const Instr& x = ins[i];
    auto arg = [&](size_t k) { return cls[static_cast<size_t>(x.args[k])]; };
    auto is_const = [&](size_t k) { return ins[static_cast<size_t>(x.args[k])].op == ExprOp::Const; };
    auto nonzero_const = [&](size_t k) {
      const Instr& c = ins[static_cast<size_t>(x.args[k])];
      return c.op == ExprOp::Const && c.kind == ValueKind::Float && std::isfinite(c.value) && c.value != 0;
    };
    bool all_finite = true, any_linear = false, any_unsafe = false;
    for (size_t k = 0; k < x.args.size(); ++k) {
      all_finite &= arg(k) == Cls::Finite;
      any_linear |= arg(k) == Cls::Linear;
      any_unsafe |= arg(k) == Cls::Unsafe;
    }
    Cls c = Cls::Unsafe;
    switch (x.op) {
      case ExprOp::Score: c = Cls::Linear; break;
      case ExprOp::Const: c = x.kind != ValueKind::Float || std::isfinite(x.value) ? Cls::Finite : Cls::Unsafe; break;
      case ExprOp::Batch: case ExprOp::Head: case ExprOp::QIdx: case ExprOp::KVIdx: c = Cls::Finite; break;
      case ExprOp::Tanh: case ExprOp::Sigmoid:
        c = any_unsafe ? Cls::Unsafe : all_finite ? Cls::Finite : Cls::Bounded;
        break;
      case ExprOp::Sin: case ExprOp::Cos: c = all_finite ? Cls::Finite : Cls::Unsafe; break;
      case ExprOp::Neg: c = arg(0); break;
      case ExprOp::Mul:
        if (any_linear) {  // the linear operand times a finite nonzero constant
          c = (arg(0) == Cls::Linear && nonzero_const(1)) || (arg(1) == Cls::Linear && nonzero_const(0)) ? Cls::Linear
                                                                                                        : Cls::Unsafe;
        } else if (!any_unsafe && (!all_finite || is_const(0) || is_const(1) || x.kind != ValueKind::Float)) {
          c = all_finite ? Cls::Finite : Cls::Bounded;  // bounded x bounded / finite; index floats times a constant
        }
        break;
      case ExprOp::Div:
        if (arg(0) == Cls::Linear && nonzero_const(1)) c = Cls::Linear;
        else if (arg(0) != Cls::Unsafe && arg(0) != Cls::Linear && nonzero_const(1)) c = arg(0);
        break;
      case ExprOp::Add: case ExprOp::Sub:
        if (any_linear) {  // linear +- finite (a linear value minus another could be inf - inf)
          c = (arg(0) == Cls::Linear && arg(1) == Cls::Finite) || (arg(1) == Cls::Linear && arg(0) == Cls::Finite)
                  ? Cls::Linear
                  : Cls::Unsafe;
          break;
        }
        [[fallthrough]];
      case ExprOp::Min: case ExprOp::Max: case ExprOp::Abs: case ExprOp::Where: case ExprOp::Cast:
      case ExprOp::Floor: case ExprOp::Ceil:
        if (!any_unsafe && !any_linear) c = all_finite ? Cls::Finite : Cls::Bounded;
        break;
      case ExprOp::Eq: case ExprOp::Ne: case ExprOp::Lt: case ExprOp::Le: case ExprOp::Gt: case ExprOp::Ge:
      case ExprOp::And: case ExprOp::Or: case ExprOp::Not:
        c = Cls::Finite;  // a bool; comparisons of infinite scores are still bools
        break;
      default: break;
    }
    cls[i] = c;
  }
  const Cls out = cls[static_cast<size_t>(vd.outputs()[1])];
  if (out == Cls::Finite || out == Cls::Bounded) return {};
  return fmt::format("its derivative d/dscore = {} may be inf or NaN at the infinite scores cuDNN's engines compute on "
                     "padding (where dS is 0; cuDNN builds no backward graph that masks them)", vd.to_string(1));
}

// A score_mod none of lower_score's forms matches, op by op as cuDNN pointwise operations (OpInfo::cudnn): the
// program with its derivative (ScoreModBackward::value_and_dscore) when every instruction lowers, else why not.
//   floats   any op with a cuDNN mode, computed in float32 (as the fused kernels do for bf16 / fp16 inputs)
//   ints     b, h, q_idx, kv_idx (cuDNN's generated indices), constants, and + - * neg abs min max where()
//            whose values stay below 2^31 in magnitude (cuDNN computes them in int32; the op table's int64 gives
//            the same values there), compared or cast to float
//   bools    comparisons, & | not, where()
// Declined: captured tensors, exp2 / log2, // and %, float -> int casts, integer powers.
std::string lower_pointwise(const ModProgram& p, const CudnnLoweringInput& in, CudnnSdpaSpec& s) {
  ScoreModBackward g = derive_score_mod(p);
  const ModProgram& vd = g.value_and_dscore;
  constexpr double kInt32 = 2147483647.0;
  std::vector<double> bound(vd.size(), 0);  // |value| bound of each int instruction
  for (size_t i = 0; i < vd.size(); ++i) {
    const Instr& x = vd.instrs()[i];
    auto decline = [&](const std::string& what) {
      return fmt::format("score_mod: {} (instruction {}) has no cuDNN pointwise form: {} (formula: {})",
                         expr_op_name(x.op), i, what, p.to_string());
    };
    auto operand_bound = [&](size_t k) { return bound[static_cast<size_t>(x.args[k])]; };
    switch (x.op) {
      case ExprOp::Score: continue;
      case ExprOp::Batch: bound[i] = static_cast<double>(in.B); continue;
      case ExprOp::Head: bound[i] = static_cast<double>(in.Hq); continue;
      case ExprOp::QIdx: bound[i] = static_cast<double>(in.Lq); continue;
      case ExprOp::KVIdx: bound[i] = static_cast<double>(in.Lkv); continue;
      case ExprOp::Const:
        if (x.kind == ValueKind::Bool) return decline("a constant bool operand");
        if (x.kind == ValueKind::Int) bound[i] = std::fabs(static_cast<double>(x.ivalue));
        if (bound[i] >= kInt32) return decline("an integer constant beyond int32");
        continue;
      case ExprOp::Index:
        return decline(fmt::format("a read of captured tensor '{}'", vd.captures()[static_cast<size_t>(x.capture)].name));
      default: break;
    }
    const OpInfo& info = op_info(x.op);
    if (info.cudnn == nullptr) return decline("cuDNN has no such pointwise mode");
    const ValueKind operand = vd.instrs()[static_cast<size_t>(x.args.back())].kind;
    if (x.op == ExprOp::Cast && !(x.kind == ValueKind::Float && operand == ValueKind::Int)) {
      return decline("only int -> float casts lower");
    }
    if (x.op == ExprOp::Pow && x.kind != ValueKind::Float) return decline("an integer power");
    // cuDNN broadcasts a pointwise op's second operand only: a constant goes second (pointwise_program swaps or
    // rewrites the rest), which c ** x cannot.
    if (x.op == ExprOp::Pow && vd.instrs()[static_cast<size_t>(x.args[0])].op == ExprOp::Const) {
      return decline("a constant raised to a power that varies");
    }
    if (x.kind == ValueKind::Int) {
      double b = 0;
      switch (x.op) {
        case ExprOp::Add: case ExprOp::Sub: b = operand_bound(0) + operand_bound(1); break;
        case ExprOp::Mul: b = operand_bound(0) * operand_bound(1); break;
        case ExprOp::Min: case ExprOp::Max: b = std::max(operand_bound(0), operand_bound(1)); break;
        case ExprOp::Neg: case ExprOp::Abs: case ExprOp::Floor: case ExprOp::Ceil: b = operand_bound(0); break;
        case ExprOp::Where: b = std::max(operand_bound(1), operand_bound(2)); break;
        default: return decline("an integer op cuDNN would compute in int32 with another meaning");
      }
      if (b >= kInt32) return decline(fmt::format("its integer value may reach {} (cuDNN computes ints in int32)", b));
      bound[i] = b;
    }
  }
  const Instr& value = vd.instrs()[static_cast<size_t>(vd.outputs()[0])];
  if (value.op == ExprOp::Const || value.kind != ValueKind::Float) {
    return fmt::format("score_mod: {} is a constant or not a float (cuDNN's softmax reads a float per entry)",
                       p.to_string());
  }
  s.pointwise = std::make_shared<const ModProgram>(vd);
  s.pointwise_text = p.to_string();
  if (std::string why = derivative_unsafe_on_infinite_scores(vd); !why.empty()) {
    s.pointwise_backward_declined = fmt::format("score_mod {}: {}", s.pointwise_text, why);
  }
  return {};
}

std::string lower_score(const ModProgram& p, const CudnnLoweringInput& in, CudnnSdpaSpec& s) {
  const Instr& out = p.instrs()[p.output()];
  if (out.op == ExprOp::Score) return {};
  if (out.op == ExprOp::Mul || out.op == ExprOp::Div) {
    const Instr& a = p.instrs()[out.args[0]];
    const Instr& b = p.instrs()[out.args[1]];
    const bool score_first = a.op == ExprOp::Score && b.op == ExprOp::Const;
    const bool score_second = out.op == ExprOp::Mul && b.op == ExprOp::Score && a.op == ExprOp::Const;
    if (score_first || score_second) {
      const Instr& k = score_first ? b : a;
      const double c = k.kind == ValueKind::Float ? k.value : static_cast<double>(k.ivalue);
      if (!std::isfinite(c) || c == 0 || (out.op == ExprOp::Div && !std::isfinite(1.0 / c))) {
        return fmt::format("score_mod: {} scales the score by a constant that is zero or not finite", p.to_string());
      }
      s.score_scale = out.op == ExprOp::Div ? 1.0 / c : c;
      return {};
    }
  }
  if (out.op == ExprOp::Add) {
    for (int side = 0; side < 2; ++side) {
      const Instr& a = p.instrs()[out.args[side]];
      const int32_t f = out.args[1 - side];
      if (a.op == ExprOp::Score && (p.instrs()[f].deps & kUsesScore) == 0) {
        CudnnSdpaSpec with_bias = s;  // lower_bias may fill some fields before it declines
        const std::string bias_why = lower_bias(p, f, in, with_bias);
        if (bias_why.empty()) {
          s = std::move(with_bias);
          return {};
        }
        const std::string pointwise_why = lower_pointwise(p, in, s);
        return pointwise_why.empty() ? std::string() : fmt::format("{}; as pointwise ops: {}", bias_why, pointwise_why);
      }
    }
  }
  return lower_pointwise(p, in, s);
}

}  // namespace

std::string CudnnSdpaSpec::describe() const {
  std::string s;
  if (!right_bound && !left_bound) s = "no mask";
  else if (causal()) s = "causal";
  else s = fmt::format("band [left {}, right {}]", left_bound ? std::to_string(*left_bound) : "none",
                       right_bound ? std::to_string(*right_bound) : "none");
  if (score_scale != 1.0) s += fmt::format(" * {}", score_scale);
  if (pointwise) s += fmt::format(" + pointwise score_mod [{}]", pointwise_text);
  if (bias == Bias::Tensor) {
    static const char* kRole[4] = {"b", "h", "q", "kv"};
    std::vector<std::string> dims;
    for (int r = 0; r < 4; ++r) if (bias_dim[r] >= 0) dims.push_back(kRole[r]);
    s += fmt::format(" + bias cap{}[{}]{}", bias_capture, fmt::join(dims, ", "), bias_learnable ? " (learnable)" : "");
  } else if (bias == Bias::Alibi) {
    if (alibi_capture >= 0) s += fmt::format(" + alibi cap{}[h]", alibi_capture);
    else s += fmt::format(" + alibi slopes [{}]", fmt::join(alibi_slopes, ", "));
  }
  return s;
}

CudnnLowering lower_to_cudnn(const CudnnLoweringInput& in) {
  CudnnLowering r;
  auto decline = [&r](std::string why) {
    r.declined = std::move(why);
    return r;
  };
  if (in.dtype != kBFloat16 && in.dtype != kFloat16) {
    return decline(fmt::format("dtype {}: cuDNN's fused SDPA runs bfloat16 and float16", in.dtype));
  }
  if (in.E % 8 != 0 || in.Ev % 8 != 0 || in.E > 256 || in.Ev > 256 || in.E <= 0 || in.Ev <= 0) {
    return decline(fmt::format("head dims E={} Ev={}: cuDNN's fused SDPA needs multiples of 8 up to 256", in.E, in.Ev));
  }
  if (in.Bkv != in.B) {
    return decline(fmt::format("K/V batch {} broadcast over q batch {}: not lowered (cuDNN reads one K/V per batch)",
                               in.Bkv, in.B));
  }
  CudnnSdpaSpec s;
  Band band;
  if (in.block_mask) {
    const BlockMask& bm = *in.block_mask;
    FG_CHECK(bm.mask_program() != nullptr, ValueError, "lower_to_cudnn: the BlockMask has no traced mask_mod");
    std::string why;
    auto b = diagonal_band(*bm.mask_program(), why);
    if (!b) return decline(why);
    band = *b;
    if (band.lo > band.hi) return decline("mask_mod: the band is empty (no key is allowed)");
    if (std::string blocks = check_blocks(bm, band, in.Lq, in.Lkv); !blocks.empty()) return decline(blocks);
  }
  if (band.lo != -kNoBound) {
    if (band.lo > 0) {
      return decline(fmt::format("mask_mod: keeps only kv_idx <= q_idx - {} (cuDNN's right bound would be {}; it "
                                 "must be >= 0)", band.lo, -band.lo));
    }
    s.right_bound = -band.lo;
  }
  if (band.hi != kNoBound) {
    if (band.hi < 0) {
      return decline(fmt::format("mask_mod: keeps only kv_idx >= q_idx + {} (cuDNN's left bound would be {}; it "
                                 "must be > 0)", -band.hi, band.hi + 1));
    }
    if (in.Lq > in.Lkv) {
      return decline(fmt::format("mask_mod: a left bound (sliding window) with Lq {} > Lkv {} (cuDNN supports "
                                 "Lq <= Lkv there)", in.Lq, in.Lkv));
    }
    s.left_bound = band.hi + 1;
  }
  // Every row must keep a key: row q keeps kv in [q - hi, q - lo] within [0, Lkv).
  for (int64_t q = 0; q < in.Lq; ++q) {
    const int64_t first = band.hi == kNoBound ? 0 : std::max<int64_t>(0, q - band.hi);
    const int64_t last = band.lo == -kNoBound ? in.Lkv - 1 : std::min(in.Lkv - 1, q - band.lo);
    if (first > last) {
      return decline(fmt::format("query row {} has no allowed key (flex_attention gives it out 0 and lse -inf; cuDNN's "
                                 "softmax does not)", q));
    }
  }
  if (in.score_mod) {
    if (std::string why = lower_score(*in.score_mod, in, s); !why.empty()) return decline(why);
  }
  if (s.bias == CudnnSdpaSpec::Bias::Alibi && s.right_bound != 0) {
    return decline(fmt::format("ALiBi under the mask '{}': cuDNN's ALiBi requires the causal diagonal (right bound "
                               "0)", s.describe()));
  }
  r.spec = std::move(s);
  return r;
}

}  // namespace fg
