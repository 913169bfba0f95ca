// Reverse-mode symbolic differentiation of score_mod programs (see mod_grad.h).
#include "attention/mod_grad.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace fg {

namespace {

// Re-emits forward instruction `in` (operands already mapped) into the builder.
int32_t reemit(ProgramBuilder& pb, const Instr& in, const std::vector<int32_t>& m) {
  std::vector<int32_t> args;
  for (int32_t a : in.args) args.push_back(m[a]);
  switch (in.op) {
    case ExprOp::Const:
      return in.kind == ValueKind::Float ? pb.constant_float(in.value)
             : in.kind == ValueKind::Int ? pb.constant_int(in.ivalue)
                                         : pb.constant_bool(in.ivalue != 0);
    case ExprOp::Score: case ExprOp::Batch: case ExprOp::Head: case ExprOp::QIdx: case ExprOp::KVIdx:
      return pb.input(in.op);
    case ExprOp::Index: return pb.index(in.capture, std::move(args));
    case ExprOp::Cast: return pb.cast(args[0], in.kind, in.implicit);
    default: return pb.emit(in.op, in.kind, std::move(args), in.implicit);
  }
}

}  // namespace

ScoreModBackward derive_score_mod(const ModProgram& fwd) {
  FG_CHECK(fwd.type() == ModProgram::Type::Score, ValueError,
           "derive_score_mod: expected a score_mod program, got a {} program",
           fwd.type() == ModProgram::Type::Mask ? "mask_mod" : "derived");
  using VK = ValueKind;
  ProgramBuilder pb(fwd.captures());
  const auto& ins = fwd.instrs();
  const size_t n = ins.size();
  std::vector<int32_t> m(n);
  for (size_t i = 0; i < n; ++i) m[i] = reemit(pb, ins[i], m);

  std::vector<int32_t> adj(n, -1);
  auto acc = [&](int32_t j, int32_t contrib) {
    if (ins[j].kind != VK::Float) return;  // ints and bools carry no gradient
    adj[j] = adj[j] < 0 ? contrib : pb.add(adj[j], contrib);
  };
  auto C = [&](double v) { return pb.constant_float(v); };
  auto zero_where = [&](int32_t cond, int32_t g, bool g_when_true) {
    return g_when_true ? pb.emit(ExprOp::Where, VK::Float, {cond, g, C(0)})
                       : pb.emit(ExprOp::Where, VK::Float, {cond, C(0), g});
  };
  auto F = [&](ExprOp op, int32_t x) { return pb.emit(op, VK::Float, {x}); };
  auto cmp = [&](ExprOp op, int32_t x, int32_t y) { return pb.emit(op, VK::Bool, {x, y}); };

  const int32_t out = fwd.output();
  adj[out] = C(1);
  std::vector<int32_t> term_instrs;
  for (int32_t i = static_cast<int32_t>(n) - 1; i >= 0; --i) {
    if (adj[i] < 0) continue;
    const Instr& in = ins[i];
    const int32_t g = adj[i], y = m[i];
    const int32_t a = in.args.size() > 0 ? m[in.args[0]] : -1;
    const int32_t b = in.args.size() > 1 ? m[in.args[1]] : -1;
    const int32_t A = in.args.size() > 0 ? in.args[0] : -1;
    const int32_t B = in.args.size() > 1 ? in.args[1] : -1;
    if (in.kind != VK::Float) continue;
    switch (in.op) {
      case ExprOp::Index: term_instrs.push_back(i); break;
      case ExprOp::Add: acc(A, g); acc(B, g); break;
      case ExprOp::Sub: acc(A, g); acc(B, pb.neg(g)); break;
      case ExprOp::Mul: acc(A, pb.mul(g, b)); acc(B, pb.mul(g, a)); break;
      case ExprOp::Div: acc(A, pb.div(g, b)); acc(B, pb.neg(pb.div(pb.mul(g, y), b))); break;
      case ExprOp::Neg: acc(A, pb.neg(g)); break;
      case ExprOp::Abs: {
        int32_t sign = pb.emit(ExprOp::Where, VK::Float,
                               {cmp(ExprOp::Gt, a, C(0)), C(1),
                                pb.emit(ExprOp::Where, VK::Float, {cmp(ExprOp::Lt, a, C(0)), C(-1), C(0)})});
        acc(A, pb.mul(g, sign));
        break;
      }
      case ExprOp::Exp: acc(A, pb.mul(g, y)); break;
      case ExprOp::Exp2: acc(A, pb.mul(g, pb.mul(C(std::numbers::ln2), y))); break;
      case ExprOp::Log: acc(A, pb.div(g, a)); break;
      case ExprOp::Log2: acc(A, pb.div(g, pb.mul(C(std::numbers::ln2), a))); break;
      case ExprOp::Sqrt: acc(A, pb.div(pb.mul(C(0.5), g), y)); break;
      case ExprOp::Rsqrt: acc(A, pb.mul(pb.mul(C(-0.5), g), pb.mul(pb.mul(y, y), y))); break;
      case ExprOp::Sin: acc(A, pb.mul(g, F(ExprOp::Cos, a))); break;
      case ExprOp::Cos: acc(A, pb.neg(pb.mul(g, F(ExprOp::Sin, a)))); break;
      case ExprOp::Tan: acc(A, pb.mul(g, pb.add(C(1), pb.mul(y, y)))); break;
      case ExprOp::Tanh: acc(A, pb.mul(g, pb.sub(C(1), pb.mul(y, y)))); break;
      case ExprOp::Sigmoid: acc(A, pb.mul(g, pb.mul(y, pb.sub(C(1), y)))); break;
      case ExprOp::Floor: case ExprOp::Ceil: case ExprOp::FloorDiv: break;  // zero almost everywhere
      case ExprOp::Mod:  // a - floor(a/b) * b
        acc(A, g);
        acc(B, pb.neg(pb.mul(g, F(ExprOp::Floor, pb.div(a, b)))));
        break;
      case ExprOp::Pow:
        acc(A, pb.mul(g, pb.mul(b, pb.emit(ExprOp::Pow, VK::Float, {a, pb.sub(b, C(1))}))));
        if (!pb.is_const(b)) acc(B, pb.mul(g, pb.mul(y, F(ExprOp::Log, a))));
        break;
      case ExprOp::Min:
      case ExprOp::Max: {
        // As torch.minimum/maximum: the gradient goes to the selected operand, split in half on ties.
        const ExprOp wins = in.op == ExprOp::Min ? ExprOp::Lt : ExprOp::Gt;
        const int32_t tie = cmp(ExprOp::Eq, a, b), half = pb.mul(C(0.5), g);
        acc(A, pb.emit(ExprOp::Where, VK::Float, {tie, half, zero_where(cmp(wins, a, b), g, true)}));
        acc(B, pb.emit(ExprOp::Where, VK::Float, {tie, half, zero_where(cmp(wins, b, a), g, true)}));
        break;
      }
      case ExprOp::Where:
        acc(B, zero_where(a, g, true));
        acc(in.args[2], zero_where(a, g, false));
        break;
      default: break;  // Const, Score (read below), casts from int/bool (no gradient)
    }
  }

  ScoreModBackward r;
  int32_t score_id = -1;
  for (size_t i = 0; i < n; ++i)
    if (ins[i].op == ExprOp::Score) score_id = static_cast<int32_t>(i);
  const int32_t dscore = (score_id >= 0 && adj[score_id] >= 0) ? adj[score_id] : C(0);
  std::vector<int32_t> outs{dscore};
  std::vector<std::string> names{"d_score"};
  std::reverse(term_instrs.begin(), term_instrs.end());  // in forward order
  for (int32_t t : term_instrs) {
    const Instr& in = ins[t];
    CaptureGradTerm term{in.capture, static_cast<int32_t>(in.args.size()), static_cast<int32_t>(outs.size()), -1};
    const std::string& cname = fwd.captures()[in.capture].name;
    for (size_t d = 0; d < in.args.size(); ++d) {
      outs.push_back(m[in.args[d]]);
      names.push_back(fmt::format("{}_index{}", cname, d));
    }
    term.deriv_output = static_cast<int32_t>(outs.size());
    outs.push_back(adj[t]);
    names.push_back("d_" + cname);
    r.terms.push_back(term);
  }
  r.dscore_is_constant = pb.is_const(dscore);
  r.dscore_constant = r.dscore_is_constant ? pb.const_value(dscore) : 0;
  r.program = pb.finish(std::move(outs), std::move(names));
  r.captures = fwd.captures();
  return r;
}

}  // namespace fg
