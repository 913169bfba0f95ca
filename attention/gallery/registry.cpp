// The gallery by name (see registry.h).
#include "flexgrad/attention/gallery/registry.h"

#include <set>

#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/batchify.h"
#include "flexgrad/attention/gallery/block_diffusion.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/document.h"
#include "flexgrad/attention/gallery/graphormer.h"
#include "flexgrad/attention/gallery/natten.h"
#include "flexgrad/attention/gallery/sandwich.h"
#include "flexgrad/attention/gallery/sliding_window.h"
#include "flexgrad/attention/gallery/softcap.h"

namespace fg {

namespace {

using K = GalleryParamKind;

std::string value_str(const GalleryValue& v) {
  if (const auto* i = std::get_if<int64_t>(&v)) return std::to_string(*i);
  if (const auto* d = std::get_if<double>(&v)) return fmt::format("{}", *d);
  if (const auto* t = std::get_if<Tensor>(&v)) {
    if (!t->defined()) return "undefined";
    if (t->numel() > 16) return fmt::format("{}{}", dtype_name(t->dtype()), shape_str(t->sizes()));
    std::vector<std::string> xs;
    for (double x : t->cpu().to_vector()) xs.push_back(fmt::format("{}", x));
    return fmt::format("{}[{}]", dtype_name(t->dtype()), fmt::join(xs, ", "));
  }
  const auto& s = std::get<std::shared_ptr<const GallerySpec>>(v);
  return s ? describe_gallery_spec(*s) : "none";
}

// Reads one constructor's parameters from a spec, remembering which it used.
class Args {
 public:
  Args(const GallerySpec& spec, std::set<std::string>& used) : spec_(spec), used_(used) {}

  const GalleryValue& get(const GalleryEntry& e, const std::string& name) const {
    const GalleryParam* p = param(e, name);
    auto it = spec_.args.find(name);
    FG_CHECK(it != spec_.args.end(), ValueError, "gallery: {} needs parameter '{}' ({}: {})", e.name, name,
             gallery_param_kind_name(p->kind), p->help);
    used_.insert(name);
    return it->second;
  }
  int64_t integer(const GalleryEntry& e, const std::string& name) const {
    const GalleryValue& v = get(e, name);
    const auto* i = std::get_if<int64_t>(&v);
    FG_CHECK(i, ValueError, "gallery: {} parameter '{}' must be an integer, got {}", e.name, name, value_str(v));
    return *i;
  }
  double number(const GalleryEntry& e, const std::string& name) const {
    const GalleryValue& v = get(e, name);
    if (const auto* i = std::get_if<int64_t>(&v)) return static_cast<double>(*i);
    const auto* d = std::get_if<double>(&v);
    FG_CHECK(d, ValueError, "gallery: {} parameter '{}' must be a number, got {}", e.name, name, value_str(v));
    return *d;
  }
  Tensor tensor(const GalleryEntry& e, const std::string& name) const {
    const GalleryValue& v = get(e, name);
    const auto* t = std::get_if<Tensor>(&v);
    FG_CHECK(t && t->defined(), ValueError, "gallery: {} parameter '{}' must be a tensor, got {}", e.name, name,
             value_str(v));
    return *t;
  }
  const GallerySpec& mask(const GalleryEntry& e, const std::string& name) const {
    const GalleryValue& v = get(e, name);
    const auto* s = std::get_if<std::shared_ptr<const GallerySpec>>(&v);
    FG_CHECK(s && *s && !(*s)->mask.empty() && (*s)->score.empty(), ValueError,
             "gallery: {} parameter '{}' must be a mask (a spec naming a mask and no score), got {}", e.name, name,
             value_str(v));
    return **s;
  }

 private:
  static const GalleryParam* param(const GalleryEntry& e, const std::string& name) {
    for (const auto& p : e.params)
      if (p.name == name) return &p;
    FG_FAIL(ValueError, "gallery: internal: {} reads undeclared parameter '{}'", e.name, name);
  }
  const GallerySpec& spec_;
  std::set<std::string>& used_;
};

struct Built {
  MaskMod mask;
  ScoreMod score;
  std::map<std::string, Tensor> tables;
};
using Builder = Built (*)(const GalleryEntry&, const Args&, Device);

NattenShape natten_shape(const GalleryEntry& e, const Args& a) {
  return {a.integer(e, "canvas_w"), a.integer(e, "canvas_h"), a.integer(e, "kernel_w"), a.integer(e, "kernel_h")};
}
MaskMod inner_mask(const GalleryEntry& e, const Args& a, Device device) {
  return build_gallery_mods(a.mask(e, "inner"), device).mask_mod;
}

const std::vector<GalleryParam> kNattenParams = {
    {"canvas_w", K::Int, "canvas width"}, {"canvas_h", K::Int, "canvas height"},
    {"kernel_w", K::Int, "kernel width"}, {"kernel_h", K::Int, "kernel height"}};

struct Registered {
  GalleryEntry entry;
  Builder build;
};

const std::vector<Registered>& registered() {
  static const std::vector<Registered> r = {
      {{"causal", false, {}, "q >= kv (Vaswani et al. 2017)"},
       [](const GalleryEntry&, const Args&, Device) { return Built{causal_mask(), {}, {}}; }},
      {{"prefix_lm", false, {{"prefix_length", K::Int, "bidirectional prefix length"}},
        "kv < prefix_length or q >= kv (T5, Raffel et al. 2020)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         return Built{prefix_lm_mask(a.integer(e, "prefix_length")), {}, {}};
       }},
      {{"sliding_window", false, {{"window", K::Int, "keys back from the query"}},
        "q >= kv and q - kv <= window (Child et al. 2019; Mistral 7B)"},
       [](const GalleryEntry& e, const Args& a, Device) { return Built{sliding_window_mask(a.integer(e, "window")), {}, {}}; }},
      {{"natten", false, kNattenParams, "2-D neighbourhood over a row-major canvas (NAT, Hassani et al. 2023)"},
       [](const GalleryEntry& e, const Args& a, Device) { return Built{natten_mask(natten_shape(e, a)), {}, {}}; }},
      {{"tiled_natten", false,
        [] {
          auto p = kNattenParams;
          p.push_back({"tile_w", K::Int, "tile width"});
          p.push_back({"tile_h", K::Int, "tile height"});
          return p;
        }(),
        "NATTEN over static tiles in tile-major order (attention-gym)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         return Built{tiled_natten_mask(natten_shape(e, a), a.integer(e, "tile_w"), a.integer(e, "tile_h")), {}, {}};
       }},
      {{"morton_natten", false, kNattenParams, "NATTEN over a Morton (Z-order) index (attention-gym)"},
       [](const GalleryEntry& e, const Args& a, Device) { return Built{morton_natten_mask(natten_shape(e, a)), {}, {}}; }},
      {{"dilated_sliding_window", false,
        {{"window", K::Int, "max |q - kv|"}, {"dilation", K::Int, "keep every dilation-th key"}},
        "|q - kv| <= window and |q - kv| % dilation == 0 (Longformer, Beltagy et al. 2020)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         return Built{dilated_sliding_window_mask(a.integer(e, "window"), a.integer(e, "dilation")), {}, {}};
       }},
      {{"global_sliding_window", false,
        {{"window", K::Int, "max |q - kv|"}, {"is_global", K::BoolTensor, "bool [S]: the global tokens"}},
        "|q - kv| <= window or is_global[q] or is_global[kv] (Longformer, Beltagy et al. 2020)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         return Built{global_sliding_window_mask(a.integer(e, "window"), a.tensor(e, "is_global")), {}, {}};
       }},
      {{"document", false,
        {{"offsets", K::IntTensor, "document starts and the end [n_docs + 1]"},
         {"inner", K::Mask, "mask on document-local indices"}},
        "same document and inner on document-local indices (Krell et al. 2021)"},
       [](const GalleryEntry& e, const Args& a, Device device) {
         DocumentMask m = document_mask(a.tensor(e, "offsets"), inner_mask(e, a, device));
         return Built{m.mask_mod, {}, {{"doc", m.document_id}}};
       }},
      {{"packed_causal_document", false, {{"offsets", K::IntTensor, "document starts and the end [n_docs + 1]"}},
        "kv >= offsets[doc[q]] and q >= kv (Krell et al. 2021)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         DocumentMask m = packed_causal_document_mask(a.tensor(e, "offsets"));
         return Built{m.mask_mod, {}, {{"doc", m.document_id}}};
       }},
      {{"batchify", false, {{"n", K::Int, "chunk length"}, {"inner", K::Mask, "mask on chunk-local indices"}},
        "q // n == kv // n and inner(q % n, kv % n) (attention-gym)"},
       [](const GalleryEntry& e, const Args& a, Device device) {
         return Built{batchify_mask(a.integer(e, "n"), inner_mask(e, a, device)), {}, {}};
       }},
      {{"block_diffusion", false,
        {{"seq_len", K::Int, "length S of each half (the mask covers 2 S)"}, {"block_size", K::Int, "diffusion block"}},
        "BD3-LM's mask over [noised ; clean] (Arriola et al. 2025)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         return Built{block_diffusion_mask(a.integer(e, "seq_len"), a.integer(e, "block_size")), {}, {}};
       }},
      {{"shared_prefix", false,
        {{"offsets", K::IntTensor, "document starts and the end [n_docs + 1]"},
         {"prefix_document_id", K::IntTensor, "each document's prompt document [n_docs]"}},
        "causal per document, continuations also see their prompt (Wang & Hegde 2024)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         DocumentMask m = shared_prefix_mask(a.tensor(e, "offsets"), a.tensor(e, "prefix_document_id"));
         return Built{m.mask_mod, {}, {{"doc", m.document_id}}};
       }},
      {{"alibi", true, {{"heads", K::Int, "number of heads H"}},
        "score + (kv - q) * 2^(-8 (h + 1) / H) (Press et al. 2022)"},
       [](const GalleryEntry& e, const Args& a, Device) { return Built{{}, alibi_score_mod(a.integer(e, "heads")), {}}; }},
      {{"tanh_softcap", true, {{"cap", K::Float, "soft cap"}}, "cap * tanh(score / cap) (Gemma 2)"},
       [](const GalleryEntry& e, const Args& a, Device) { return Built{{}, tanh_softcap_score_mod(a.number(e, "cap")), {}}; }},
      {{"sandwich", true,
        {{"heads", K::Int, "number of heads H"}, {"max_seq_len", K::Int, "longest sequence"},
         {"d_bar", K::Int, "sinusoid dimension"}},
        "score + rel_bias[q - kv + M - 1] * head_scale[h] (Chi et al. 2023)"},
       [](const GalleryEntry& e, const Args& a, Device device) {
         SandwichBias s =
             sandwich_score_mod(a.integer(e, "heads"), a.integer(e, "max_seq_len"), a.integer(e, "d_bar"), device);
         return Built{{}, s.score_mod, {{"rel_bias", s.rel_bias}, {"head_scale", s.head_scale}}};
       }},
      {{"graphormer_spatial", true,
        {{"table", K::FloatTensor, "learned bias [H, max_distance + 2]"},
         {"adjacency", K::BoolTensor, "graphs [B, N, N]"},
         {"max_distance", K::Int, "distances past it share one bias"}},
        "score + table[h, dist[b, q, kv]], dist = shortest paths (Graphormer, Ying et al. 2021)"},
       [](const GalleryEntry& e, const Args& a, Device) {
         GraphormerSpatialBias g = graphormer_spatial_score_mod(a.tensor(e, "table"), a.tensor(e, "adjacency"),
                                                                a.integer(e, "max_distance"));
         return Built{{}, g.score_mod, {{"dist", g.distance}}};
       }},
  };
  return r;
}

const Registered& lookup(const std::string& name, bool score) {
  for (const auto& r : registered())
    if (r.entry.name == name) {
      FG_CHECK(r.entry.is_score == score, ValueError, "gallery: '{}' is a {}, not a {}", name,
               r.entry.is_score ? "score_mod" : "mask_mod", score ? "score_mod" : "mask_mod");
      return r;
    }
  std::vector<std::string> names;
  for (const auto& r : registered())
    if (r.entry.is_score == score) names.push_back(r.entry.name);
  FG_FAIL(ValueError, "gallery: unknown {} '{}' (known: {})", score ? "score" : "mask", name, fmt::join(names, ", "));
}

}  // namespace

const char* gallery_param_kind_name(GalleryParamKind k) {
  switch (k) {
    case K::Int: return "int";
    case K::Float: return "float";
    case K::IntTensor: return "int tensor";
    case K::BoolTensor: return "bool tensor";
    case K::FloatTensor: return "float tensor";
    case K::Mask: return "mask";
  }
  return "?";
}

const std::vector<GalleryEntry>& gallery_entries() {
  static const std::vector<GalleryEntry> entries = [] {
    std::vector<GalleryEntry> v;
    for (const auto& r : registered()) v.push_back(r.entry);
    return v;
  }();
  return entries;
}

const GalleryEntry* find_gallery_entry(const std::string& name) {
  for (const auto& e : gallery_entries())
    if (e.name == name) return &e;
  return nullptr;
}

GalleryMods build_gallery_mods(const GallerySpec& spec, Device device) {
  FG_CHECK(!spec.mask.empty() || !spec.score.empty(), ValueError, "gallery: the spec names neither a mask nor a score");
  std::set<std::string> used;
  Args args(spec, used);
  GalleryMods out;
  std::vector<std::string> names;
  if (!spec.mask.empty()) {
    const Registered& r = lookup(spec.mask, false);
    Built b = r.build(r.entry, args, device);
    out.mask_mod = std::move(b.mask);
    out.tables.merge(b.tables);
    names.push_back(r.entry.name);
  }
  if (!spec.score.empty()) {
    const Registered& r = lookup(spec.score, true);
    Built b = r.build(r.entry, args, device);
    out.score_mod = std::move(b.score);
    out.tables.merge(b.tables);
    names.push_back(r.entry.name);
  }
  for (const auto& arg : spec.args) {
    const std::string& name = arg.first;
    if (used.count(name)) continue;
    std::vector<std::string> known;
    for (const std::string& n : names)
      for (const auto& p : find_gallery_entry(n)->params) known.push_back(p.name);
    FG_FAIL(ValueError, "gallery: {} has no parameter '{}' (its parameters: {})", fmt::join(names, " + "), name,
            known.empty() ? std::string("none") : fmt::format("{}", fmt::join(known, ", ")));
  }
  out.description = describe_gallery_spec(spec);
  return out;
}

std::string describe_gallery_spec(const GallerySpec& spec) {
  auto one = [&](const std::string& name) {
    std::vector<std::string> ps;
    if (const GalleryEntry* e = find_gallery_entry(name))
      for (const auto& p : e->params) {
        auto it = spec.args.find(p.name);
        if (it != spec.args.end()) ps.push_back(p.name + "=" + value_str(it->second));
      }
    return fmt::format("{}({})", name, fmt::join(ps, ", "));
  };
  if (spec.mask.empty()) return one(spec.score);
  if (spec.score.empty()) return one(spec.mask);
  return one(spec.score) + " + " + one(spec.mask);
}

}  // namespace fg
