#include "flexgrad/attention/flex_reference.h"

#include <cmath>
#include <limits>

#include "flexgrad/attention/op_semantics.h"
#include "flexgrad/ops/ops.h"

namespace fg {
namespace {

// ModProgram visitor producing tensors (ModProgram::evaluate_with).
struct TensorVisitor {
  using Value = Tensor;
  Tensor score, b, h, q, kv;
  DType fdt;
  Device device;

  DType dtype_of_kind(ValueKind k) const { return k == ValueKind::Float ? fdt : k == ValueKind::Int ? kInt64 : kBool; }

  // An exact int64 scalar tensor: full() and from_vector() go through double, which rounds ints past
  // 2^53, so the value is written in place and copied (bytes) to the device.
  Tensor exact_int(int64_t v) const {
    Tensor t = empty({}, TensorOptions().dtype(kInt64));
    *static_cast<int64_t*>(t.data_ptr()) = v;
    return device == t.device() ? t : t.to(device);
  }
  Tensor constant(const Instr& in) {
    if (in.kind == ValueKind::Float) return full({}, in.value, TensorOptions().dtype(fdt).device(device));
    if (in.kind == ValueKind::Int) return exact_int(in.ivalue);
    return full({}, in.ivalue, TensorOptions().dtype(kBool).device(device));
  }
  Tensor input(ExprOp leaf) {
    switch (leaf) {
      case ExprOp::Score: return score;
      case ExprOp::Batch: return b;
      case ExprOp::Head: return h;
      case ExprOp::QIdx: return q;
      default: return kv;
    }
  }
  // cap[idx0, idx1, ...] as a gather from the flattened tensor (differentiable through index_select).
  Tensor index(const Instr&, const CaptureRef& cap, std::vector<Tensor> idx) {
    const Tensor& t = cap.tensor;
    FG_CHECK(static_cast<int64_t>(idx.size()) == t.dim(), ValueError,
             "flex_attention: a captured tensor of shape {} was indexed with {} indices", shape_str(t.sizes()), idx.size());
    Tensor lin;
    for (size_t d = 0; d < idx.size(); ++d) {
      Tensor i = idx[d].to(kInt64);
      const int64_t n = t.sizes()[d];
      // Python rules, as every evaluator (op_semantics.h): [-n, n) valid, negative wraps, else IndexError.
      const Tensor bad = logical_or(i < -n, i >= n);
      if (any(bad).item<bool>()) {  // report the first offending index, exactly (item() reads through double)
        const Tensor iv = i.expand(bad.sizes()).cpu().contiguous(), bv = bad.cpu().contiguous();
        const int64_t* ip = static_cast<const int64_t*>(iv.data_ptr());
        const bool* bp = static_cast<const bool*>(bv.data_ptr());
        for (int64_t e = 0; e < bv.numel(); ++e)
          if (bp[e]) throw_capture_index_error(cap, static_cast<int64_t>(d), ip[e]);
      }
      i = where(i < 0, i + n, i);
      lin = lin.defined() ? lin * n + i : i;
    }
    Tensor flat = t.device() == device ? t.reshape({-1}) : t.to(device).reshape({-1});
    Tensor picked = index_select(flat, 0, lin.reshape({-1}));
    Tensor out = picked.view(lin.sizes());
    // float captures compute in the float dtype, int ones in int64 (as every evaluator: ints are 64-bit)
    return is_floating(t.dtype()) ? out.to(fdt) : t.dtype() == kBool ? out : out.to(kInt64);
  }
  // The integer errors of the op table: a zero divisor, a negative exponent (ValueError, as the CPU).
  void check_int_op(ExprOp op, const Tensor& a, const Tensor& b) const {
    const Tensor top = exact_int(std::numeric_limits<int64_t>::max());
    if (op == ExprOp::Pow) {
      if (any(b < 0).item<bool>()) {
        const int64_t e = amin(b).item<int64_t>();
        throw_negative_int_power(amin(where(b == exact_int(e), a, top)).item<int64_t>(), e);
      }
    } else if (any(b == 0).item<bool>()) {
      throw_int_division_by_zero(op, amin(where(b == 0, a, top)).item<int64_t>());  // (a dividend, via double)
    }
  }
  // float -> int64 as the op table: truncate, saturate, NaN -> 0 (a plain conversion is undefined there).
  Tensor float_to_int(const Tensor& x) const {
    constexpr double kTop = 9223372036854775808.0;  // 2^63
    Tensor safe = where(isnan(x), 0.0, clamp(x, -kTop, 9223372036854774784.0));  // largest double < 2^63
    return where(x >= kTop, exact_int(std::numeric_limits<int64_t>::max()), safe.to(kInt64));
  }

  Tensor apply(const Instr& in, std::vector<Tensor> a) {
    const bool int_op = in.kind == ValueKind::Int;
    if (int_op && (in.op == ExprOp::FloorDiv || in.op == ExprOp::Mod || in.op == ExprOp::Pow))
      check_int_op(in.op, a[0], a[1]);
    switch (in.op) {
      case ExprOp::Neg: return neg(a[0]);
      case ExprOp::Not: return logical_not(a[0]);
      case ExprOp::Abs: return abs(a[0]);
      case ExprOp::Exp: return exp(a[0]);
      case ExprOp::Exp2: return exp2(a[0]);
      case ExprOp::Log: return log(a[0]);
      case ExprOp::Log2: return log2(a[0]);
      case ExprOp::Sqrt: return sqrt(a[0]);
      case ExprOp::Rsqrt: return rsqrt(a[0]);
      case ExprOp::Sin: return sin(a[0]);
      case ExprOp::Cos: return cos(a[0]);
      case ExprOp::Tan: return tan(a[0]);
      case ExprOp::Tanh: return tanh(a[0]);
      case ExprOp::Sigmoid: return sigmoid(a[0]);
      case ExprOp::Floor: return floor(a[0]);
      case ExprOp::Ceil: return ceil(a[0]);
      case ExprOp::Cast:
        if (in.kind == ValueKind::Int && is_floating(a[0].dtype())) return float_to_int(a[0]);
        return a[0].to(dtype_of_kind(in.kind));
      case ExprOp::Add: return add(a[0], a[1]);
      case ExprOp::Sub: return sub(a[0], a[1]);
      case ExprOp::Mul: return mul(a[0], a[1]);
      case ExprOp::Div: return div(a[0], a[1]);
      case ExprOp::FloorDiv: return floor_divide(a[0], a[1]);
      case ExprOp::Mod: return remainder(a[0], a[1]);
      case ExprOp::Pow: return pow(a[0], a[1]);
      case ExprOp::Min: return minimum(a[0], a[1]);
      case ExprOp::Max: return maximum(a[0], a[1]);
      case ExprOp::Eq: return eq(a[0], a[1]);
      case ExprOp::Ne: return ne(a[0], a[1]);
      case ExprOp::Lt: return lt(a[0], a[1]);
      case ExprOp::Le: return le(a[0], a[1]);
      case ExprOp::Gt: return gt(a[0], a[1]);
      case ExprOp::Ge: return ge(a[0], a[1]);
      case ExprOp::And: return logical_and(a[0], a[1]);
      case ExprOp::Or: return logical_or(a[0], a[1]);
      case ExprOp::Where: return where(a[0], a[1], a[2]);
      default: FG_FAIL(NotImplementedError, "flex_attention reference: IR op {} not handled", expr_op_name(in.op));
    }
  }
};

Tensor positions(int64_t n, int dim, Device device) {
  Shape shape{1, 1, 1, 1};
  shape[dim] = n;
  return arange(0, static_cast<double>(n), 1, TensorOptions().dtype(kInt64).device(device)).view(shape);
}

}  // namespace

Tensor evaluate_program_on_tensors(const ModProgram& program, const Tensor& score, int64_t B, int64_t H, int64_t Lq,
                                   int64_t Lkv, DType float_dtype, Device device) {
  TensorVisitor vis{score, positions(B, 0, device), positions(H, 1, device), positions(Lq, 2, device),
                    positions(Lkv, 3, device), float_dtype, device};
  return program.evaluate_with(vis)[0];
}

FlexAttentionResult flex_attention_reference(const FlexReferenceInputs& in) {
  const Tensor& q = in.q;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2);
  const int64_t Bkv = in.k.size(0), Hkv = in.k.size(1), Lkv = in.k.size(2), E = in.k.size(3), Ev = in.v.size(3);
  const int64_t G = Hkv > 0 ? Hq / Hkv : 1;  // no heads at all (Hq = Hkv = 0): empty results
  // K/V to the q heads and batches: [B, Hq, Lkv, *].
  auto spread = [&](const Tensor& t, int64_t D) {
    Tensor x = t.unsqueeze(2).expand({Bkv, Hkv, G, Lkv, D}).reshape({Bkv, Hq, Lkv, D});
    return x.expand({B, Hq, Lkv, D});
  };
  Tensor k = spread(in.k, E), v = spread(in.v, Ev);
  const DType dt = q.dtype();
  Tensor scores = matmul(q, k.transpose(-2, -1)) * in.scale;
  // A mod that ignores some of its inputs (the score included: `sin(q_idx)`) evaluates to a tensor broadcast
  // only over the dims it uses: expand it back to every (b, h, q, kv), or the softmax runs over too few keys.
  if (in.score_mod)
    scores = evaluate_program_on_tensors(*in.score_mod, scores, B, Hq, Lq, Lkv, dt, q.device()).expand(scores.sizes());
  if (in.block_mask) {
    const BlockMask& bm = *in.block_mask;
    // Block presence, expanded to elements: partial blocks need the mask, full blocks don't.
    Tensor kinds = bm.block_kinds();  // [Bm, Hm, nQ, nKV]: 0 empty, 1 partial, 2 full
    const int64_t bq = bm.block_size().q, bkv = bm.block_size().kv;
    Tensor qb = floor_divide(positions(Lq, 2, q.device()), full({}, bq, kInt64));
    Tensor kb = floor_divide(positions(Lkv, 3, q.device()), full({}, bkv, kInt64));
    Tensor kinds_flat = kinds.to(q.device()).reshape({kinds.size(0), kinds.size(1), -1});
    Tensor lin = (qb * kinds.size(3) + kb).reshape({-1});
    Tensor elem_kind = index_select(kinds_flat, 2, lin).view({kinds.size(0), kinds.size(1), Lq, Lkv});
    Tensor mask = elem_kind == 2;
    if (bm.mask_program()) {
      Tensor m = evaluate_program_on_tensors(*bm.mask_program(), Tensor(), B, Hq, Lq, Lkv, dt, q.device());
      mask = logical_or(mask, logical_and(elem_kind == 1, m));
    }
    scores = where(mask, scores, -std::numeric_limits<double>::infinity());
  }
  // As PyTorch's flex_attention: a row whose scores are all -inf (nothing allowed) gives output 0 and
  // lse -inf; anything else is softmax(scores) @ v, so a NaN score makes the row NaN (lse NaN too) and a
  // +inf score gives a NaN output (inf - inf) with lse +inf.
  Tensor lse = logsumexp(scores, {-1});
  Tensor empty_row = lse == -std::numeric_limits<double>::infinity();
  // p = exp(scores - row max) / sum, not exp(scores - lse): past |lse| ~ 1e17 (float64) lse rounds to the row
  // max, the log(sum) term is lost and every p of a row of equal huge scores became 1 instead of 1/n. The max
  // is detached (softmax does not depend on it); empty rows get max 0 and sum 1, so their p is 0, not 0/0.
  Tensor row_max = scores.numel() > 0 ? amax(scores.detach(), {-1}, true) : zeros_like(lse).unsqueeze(-1);
  Tensor e = exp(scores - where(empty_row.unsqueeze(-1), 0.0, row_max));
  Tensor denom = where(empty_row.unsqueeze(-1), 1.0, sum(e, {-1}, true));
  Tensor p = where(empty_row.unsqueeze(-1), 0.0, e / denom);
  FlexAttentionResult r;
  r.out = matmul(p, v);
  r.lse = lse;
  // amax rejects empty inputs; with no rows (or no keys) the max over nothing is -inf.
  r.max_scores = scores.numel() > 0 ? amax(scores, {-1})
                                    : full({B, Hq, Lq}, -std::numeric_limits<double>::infinity(), scores.options());
  return r;
}

}  // namespace fg
