// Packed-document masks (see document.h).
#include "flexgrad/attention/gallery/document.h"

namespace fg {

namespace {

// offsets as host integers, checked: 1-D int32/int64, >= 2 entries, starting at 0, non-decreasing.
std::vector<int64_t> checked_offsets(const Tensor& offsets, const char* who) {
  FG_CHECK(offsets.defined() && offsets.dim() == 1 && offsets.numel() >= 2, ShapeError,
           "{}: offsets must be a 1-D tensor [n_docs + 1] with at least 2 entries, got {}", who,
           offsets.defined() ? shape_str(offsets.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(offsets.dtype() == kInt64 || offsets.dtype() == kInt32, DTypeError,
           "{}: offsets must be int32 or int64, got {}", who, offsets.dtype());
  std::vector<int64_t> o;
  for (double v : offsets.cpu().to_vector()) o.push_back(static_cast<int64_t>(v));
  FG_CHECK(o[0] == 0, ValueError, "{}: offsets must start at 0, got offsets[0] = {}", who, o[0]);
  for (size_t i = 1; i < o.size(); ++i)
    FG_CHECK(o[i] >= o[i - 1], ValueError, "{}: offsets must be non-decreasing, got offsets[{}] = {} < offsets[{}] = {}",
             who, i, o[i], i - 1, o[i - 1]);
  return o;
}

Tensor document_ids(const std::vector<int64_t>& o, Device device) {
  std::vector<int64_t> doc(static_cast<size_t>(o.back()));
  for (size_t d = 0; d + 1 < o.size(); ++d)
    for (int64_t i = o[d]; i < o[d + 1]; ++i) doc[static_cast<size_t>(i)] = static_cast<int64_t>(d);
  return from_vector(doc, {o.back()}, kInt64).to(device);
}

}  // namespace

Tensor length_to_offsets(const std::vector<int64_t>& lengths, Device device) {
  std::vector<int64_t> o{0};
  for (size_t i = 0; i < lengths.size(); ++i) {
    FG_CHECK(lengths[i] >= 0, ValueError, "length_to_offsets: lengths[{}] must be >= 0, got {}", i, lengths[i]);
    o.push_back(o.back() + lengths[i]);
  }
  return from_vector(o, {static_cast<int64_t>(o.size())}, kInt64).to(device);
}

Tensor offsets_to_document_ids(const Tensor& offsets) {
  return document_ids(checked_offsets(offsets, "offsets_to_document_ids"), offsets.device());
}

DocumentMask document_mask(const Tensor& offsets, MaskMod inner) {
  FG_CHECK(static_cast<bool>(inner), ValueError, "document_mask: the inner mask is an empty callable");
  DocumentMask m{nullptr, offsets, document_ids(checked_offsets(offsets, "document_mask"), offsets.device())};
  Captured off(offsets, "offsets"), doc(m.document_id, "document_id");
  m.mask_mod = [off, doc, inner = std::move(inner)](Expr b, Expr h, Expr q, Expr kv) {
    Expr dq = doc[q], dkv = doc[kv];
    return (dq == dkv) & inner(b, h, q - off[dq], kv - off[dkv]);
  };
  return m;
}

DocumentMask packed_causal_document_mask(const Tensor& offsets) {
  DocumentMask m{nullptr, offsets,
                 document_ids(checked_offsets(offsets, "packed_causal_document_mask"), offsets.device())};
  Captured off(offsets, "offsets"), doc(m.document_id, "document_id");
  m.mask_mod = [off, doc](Expr, Expr, Expr q, Expr kv) { return (kv >= Expr(off[doc[q]])) & (q >= kv); };
  return m;
}

DocumentMask shared_prefix_mask(const Tensor& offsets, const Tensor& prefix_document_id) {
  const std::vector<int64_t> o = checked_offsets(offsets, "shared_prefix_mask");
  const int64_t n_docs = static_cast<int64_t>(o.size()) - 1;
  const Tensor& p = prefix_document_id;
  FG_CHECK(p.defined() && p.dim() == 1 && p.numel() == n_docs, ShapeError,
           "shared_prefix_mask: prefix_document_id must be 1-D with one entry per document ([{}]), got {}", n_docs,
           p.defined() ? shape_str(p.sizes()) : std::string("an undefined tensor"));
  FG_CHECK(p.dtype() == kInt64 || p.dtype() == kInt32, DTypeError,
           "shared_prefix_mask: prefix_document_id must be int32 or int64, got {}", p.dtype());
  const std::vector<double> pv = p.cpu().to_vector();
  for (size_t d = 0; d < pv.size(); ++d)
    FG_CHECK(pv[d] >= 0 && pv[d] < static_cast<double>(n_docs), ValueError,
             "shared_prefix_mask: prefix_document_id[{}] = {} is not a document in [0, {})", d, pv[d], n_docs);
  DocumentMask m{nullptr, offsets, document_ids(o, offsets.device())};
  Captured off(offsets, "offsets"), doc(m.document_id, "document_id"), prefix(p, "prefix_document_id");
  m.mask_mod = [off, doc, prefix](Expr, Expr, Expr q, Expr kv) {
    Expr d = doc[q];
    Expr pd = prefix[d];
    Expr own = (kv >= Expr(off[d])) & (q >= kv);
    Expr in_prefix = (d != pd) & (kv >= Expr(off[pd])) & (kv < Expr(off[pd + 1]));
    return own | in_prefix;
  };
  return m;
}

}  // namespace fg
