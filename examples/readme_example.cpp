// The README's example, compiled so that it cannot rot: ALiBi through a captured tensor, a causal
// BlockMask, the fused forward and backward.
#include <flexgrad/flexgrad.h>
using namespace fg;

int main() try {
  const int64_t B = 2, H = 4, L = 512, E = 64;
  Tensor q = randn({B, H, L, E}).requires_grad_(), k = randn({B, H, L, E}).requires_grad_(),
         v = randn({B, H, L, E}).requires_grad_();
  Tensor slopes = exp2(-(arange(1, H + 1, 1, kFloat32) * (8.0 / H)));  // captured by the score_mod
  FlexAttentionOptions opt;
  opt.score_mod = [s = Captured(slopes)](Expr score, Expr b, Expr h, Expr qi, Expr kv) {
    return score + (kv - qi) * s[h];  // ALiBi
  };
  opt.block_mask = create_block_mask([](Expr b, Expr h, Expr qi, Expr kv) { return qi >= kv; },
                                     std::nullopt, std::nullopt, L, L);  // causal: empty blocks skipped
  Tensor out = flex_attention(q, k, v, opt).out;  // [B, H, L, E], fused CPU (or CUDA) kernel
  out.sum().backward();                            // dq, dk, dv through the fused backward
  fmt::print("{}\n{}\n", opt.block_mask->to_string(), q.grad().sizes());
} catch (const std::exception& e) {
  fmt::print(stderr, "readme_example: error: {}\n", e.what());
  return 1;
}
