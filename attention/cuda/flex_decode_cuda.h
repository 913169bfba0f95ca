// Internal to attention/cuda: the split-KV forward for short queries (kernels/flex_decode.cuh), and the rule
// by which the CUDA forward picks it over the tiled kernel.
#pragma once
#include <string>

#include "flexgrad/attention/flex_kernels.h"

namespace fg::cuda {

// Why the split-KV kernel cannot run `p` (empty when it can): it runs bfloat16 / float16 with head dims up
// to 256.
std::string split_kv_unsupported(const FlexProblem& p);

// Auto's rule: split-KV when it can run and every q block's packed rows (the query heads sharing a K/V head
// times the block's q rows) fit one query tile (32 rows for head dims up to 128, else 16), so each K/V head is
// read once per q block. Decoding (one or a few tokens per sequence) always qualifies; prefill never does.
bool split_kv_preferred(const FlexProblem& p);

// Runs it; NotImplementedError (saying why) when split_kv_unsupported(p) is not empty.
void flex_split_kv_forward(const FlexProblem& p, FlexForwardOutputs& o);

}  // namespace fg::cuda
