// Reverse-mode symbolic differentiation of score_mod programs (see mod_grad.h); each op's rule is its
// row of the op table (attention/op_semantics.h).
#include "flexgrad/attention/mod_grad.h"

#include <algorithm>
#include <cmath>

#include "flexgrad/attention/op_semantics.h"

namespace fg {

ScoreModBackward derive_score_mod(const ModProgram& fwd) {
  FG_CHECK(fwd.type() == ModProgram::Type::Score, ValueError,
           "derive_score_mod: expected a score_mod program, got a {} program",
           fwd.type() == ModProgram::Type::Mask ? "mask_mod" : "derived");
  using VK = ValueKind;
  ProgramBuilder pb(fwd.captures());
  const auto& ins = fwd.instrs();
  const size_t n = ins.size();
  std::vector<int32_t> m(n);
  for (size_t i = 0; i < n; ++i) m[i] = pb.reemit(ins[i], m);

  std::vector<int32_t> adj(n, -1);
  auto acc = [&](int32_t j, int32_t contrib) {
    if (ins[j].kind != VK::Float) return;  // ints and bools carry no gradient
    adj[j] = adj[j] < 0 ? contrib : pb.add(adj[j], contrib);
  };
  const int32_t out = fwd.output();
  adj[out] = pb.constant_float(1);
  std::vector<int32_t> term_instrs;
  for (int32_t i = static_cast<int32_t>(n) - 1; i >= 0; --i) {
    const Instr& in = ins[i];
    if (adj[i] < 0 || in.kind != VK::Float) continue;
    if (in.op == ExprOp::Index) {  // a read of a float capture: one gradient term
      term_instrs.push_back(i);
      continue;
    }
    const OpInfo& rule = op_info(in.op);
    if (rule.grad == nullptr) continue;  // leaves, piecewise-constant ops
    GradContext c{pb, adj[i], m[i], {-1, -1, -1}, {VK::Float, VK::Float, VK::Float}};
    for (size_t k = 0; k < in.args.size(); ++k) {
      c.x[k] = m[in.args[k]];
      c.kind[k] = ins[in.args[k]].kind;
    }
    rule.grad(c);
    for (size_t k = 0; k < in.args.size(); ++k)
      if (c.dx[k] >= 0) acc(in.args[k], c.dx[k]);
  }

  ScoreModBackward r;
  int32_t score_id = -1;
  for (size_t i = 0; i < n; ++i)
    if (ins[i].op == ExprOp::Score) score_id = static_cast<int32_t>(i);
  const int32_t dscore = (score_id >= 0 && adj[score_id] >= 0) ? adj[score_id] : pb.constant_float(0);
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
  r.value_and_dscore = pb.finish({m[out], dscore}, {"score_mod", "d_score"});
  r.captures = fwd.captures();
  return r;
}

}  // namespace fg
