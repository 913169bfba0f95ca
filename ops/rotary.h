// Rotary position embedding (RoPE, rotate-half layout as GPT-NeoX / Llama) as one fused op:
//   rotary_embedding(x, cos, sin) = cat(x1 cos - x2 sin, x2 cos + x1 sin)   over the last dim of x,
// x [..., L, E] (E even, at most 4 dims in all), cos / sin [L, E/2] (the angle of position l, frequency i).
// One pass forward and one backward (the inverse rotation of the output gradient), where the composed
// narrow/mul/cat form costs a dozen kernels over strided views. The output is contiguous. cos and sin are
// constants of the graph: passing tables that require grad is refused (nn::RotaryEmbedding keeps them as
// buffers).
#pragma once
#include "flexgrad/tensor/tensor.h"

namespace fg {

Tensor rotary_embedding(const Tensor& x, const Tensor& cos, const Tensor& sin);

}  // namespace fg
