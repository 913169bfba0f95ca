// Packed documents: several sequences concatenated into one, attention kept inside each (no
// cross-contamination), described by the documents' offsets. The constructors build the per-position
// document ids themselves and return them with the mask, so the table the kernels read is inspectable.
#pragma once
#include <cstdint>
#include <vector>

#include "flexgrad/attention/expr.h"

namespace fg {

// [0, l0, l0 + l1, ..., sum(lengths)] as an int64 tensor on `device` (attention-gym's length_to_offsets).
// ValueError for a negative length.
Tensor length_to_offsets(const std::vector<int64_t>& lengths, Device device = kCPU);

// The document of each position: repeat_interleave(arange(n_docs), diff(offsets)), int64 [offsets[-1]] on
// offsets' device. offsets must be a 1-D int32/int64 tensor with at least 2 entries, starting at 0 and
// non-decreasing (ShapeError / DTypeError / ValueError naming what is wrong otherwise).
Tensor offsets_to_document_ids(const Tensor& offsets);

// A document mask and the tables it captures; callable as a MaskMod.
struct DocumentMask {
  MaskMod mask_mod;
  Tensor offsets;      // as given: int32/int64 [n_docs + 1]
  Tensor document_id;  // built: int64 [offsets[-1]], on offsets' device
  Expr operator()(Expr b, Expr h, Expr q, Expr kv) const { return mask_mod(b, h, q, kv); }
};

// Same document, and inner(b, h, q - offsets[doc[q]], kv - offsets[doc[kv]]): any mask applied to
// document-local positions (a causal or sliding-window inner mask restarts at each document).
// Positions past offsets[-1] are an IndexError when the mask is evaluated.
// Source: Krell et al., "Efficient Sequence Packing without Cross-contamination", 2021; attention-gym
// attn_gym/masks/document_mask.py (generate_doc_mask_mod). ValueError for an empty inner mask.
DocumentMask document_mask(const Tensor& offsets, MaskMod inner);

// kv >= offsets[doc[q]] and q >= kv: causal within each packed document (one lookup per query instead of
// comparing two document ids). Source: as document_mask.
DocumentMask packed_causal_document_mask(const Tensor& offsets);

// Shared prefix: d = doc[q], p = prefix_document_id[d]; (kv >= offsets[d] and q >= kv) or (d != p and
// offsets[p] <= kv < offsets[p + 1]). Prompt documents map to themselves and are causal; each continuation
// document is causal within itself and also sees its whole prompt, which is stored once for all of them.
// prefix_document_id: 1-D int32/int64 with one entry per document, each in [0, n_docs) (ShapeError /
// DTypeError / ValueError otherwise). Source: Wang, Hegde, "Accelerating Direct Preference Optimization with
// Prefix Sharing", 2024; attention-gym attn_gym/masks/shared_prefix.py.
DocumentMask shared_prefix_mask(const Tensor& offsets, const Tensor& prefix_document_id);

}  // namespace fg
