// affine_score_form (see affine_score.h): two pattern matches on the program's instruction list, then the core
// rebuilt through ProgramBuilder (so it is folded and CSE'd as any traced program).
#include "flexgrad/attention/affine_score.h"

#include <cmath>

namespace fg {

namespace {

// A float constant's value, if instruction `id` of `p` is one.
std::optional<double> float_const(const ModProgram& p, int32_t id) {
  const Instr& in = p.instrs()[id];
  if (in.op != ExprOp::Const || in.kind != ValueKind::Float) return std::nullopt;
  return in.value;
}

// `x * c`, `c * x` or `x / d` of floats with a constant factor: {x, c or 1 / d}.
std::optional<std::pair<int32_t, double>> constant_factor(const ModProgram& p, int32_t id) {
  const Instr& in = p.instrs()[id];
  if (in.kind != ValueKind::Float || in.args.size() != 2) return std::nullopt;
  const int32_t a = in.args[0], b = in.args[1];
  if (in.op == ExprOp::Mul) {
    if (auto c = float_const(p, b); c && !float_const(p, a)) return std::pair{a, *c};
    if (auto c = float_const(p, a); c && !float_const(p, b)) return std::pair{b, *c};
  }
  if (in.op == ExprOp::Div)
    if (auto d = float_const(p, b); d && *d != 0 && !float_const(p, a)) return std::pair{a, 1.0 / *d};
  return std::nullopt;
}

}  // namespace

std::optional<AffineScoreForm> affine_score_form(const ModProgram& p) {
  if (p.type() != ModProgram::Type::Score) return std::nullopt;
  const auto& ins = p.instrs();
  // The output: y times a positive constant.
  const auto out = constant_factor(p, p.output());
  if (!out || !std::isfinite(out->second) || !(out->second > 0)) return std::nullopt;
  // The score's one reader, if it is the score times a nonzero constant (else the factor on the score is 1).
  int32_t score = -1, reader = -1;
  bool one_reader = true;
  for (size_t i = 0; i < ins.size(); ++i)
    if (ins[i].op == ExprOp::Score) score = static_cast<int32_t>(i);
  for (size_t i = 0; i < ins.size() && score >= 0; ++i)
    for (int32_t a : ins[i].args)
      if (a == score) {
        one_reader = one_reader && (reader < 0 || reader == static_cast<int32_t>(i));
        reader = static_cast<int32_t>(i);
      }
  std::optional<std::pair<int32_t, double>> in;
  if (reader >= 0 && one_reader && reader != p.output()) in = constant_factor(p, reader);
  if (in && (in->first != score || !std::isfinite(in->second) || in->second == 0)) in.reset();

  AffineScoreForm f;
  f.out_factor = out->second;
  if (in) {
    f.in_factor = in->second;
    f.scaled_score = reader;
  }
  ProgramBuilder pb(p.captures());
  std::vector<int32_t> m(ins.size(), -1);
  for (size_t i = 0; i < ins.size(); ++i)
    m[i] = static_cast<int32_t>(i) == f.scaled_score ? pb.input(ExprOp::Score) : pb.reemit(ins[i], m);
  f.core = pb.finish({m[out->first]}, {"core"}, ModProgram::Type::Score);
  return f;
}

}  // namespace fg
