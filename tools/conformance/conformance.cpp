#include "tools/conformance/conformance.h"

#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <set>
#include <nlohmann/json.hpp>

#include "flexgrad/attention/gallery/alibi.h"
#include "flexgrad/attention/gallery/causal.h"
#include "flexgrad/attention/gallery/registry.h"
#include "flexgrad/attention/gallery/sliding_window.h"
#include "flexgrad/attention/gallery/softcap.h"
#include "flexgrad/attention/mask_mods.h"
#include "flexgrad/ops/ops.h"

namespace fg {
namespace {

using Captures = std::map<std::string, Tensor>;
struct CaseDef {
  std::function<ScoreMod(const Captures&)> score_mod;  // empty: identity
  std::function<MaskMod(const Captures&)> mask_mod;    // empty: noop_mask
};

MaskMod causal(const Captures&) { return causal_mask(); }

// The PyTorch definitions of ../shared/conformance/README.md, by case name (through the gallery's
// constructors where one is the case's definition: ALiBi, softcap, sliding window, prefix LM, causal).
const std::map<std::string, CaseDef>& case_defs() {
  static const std::map<std::string, CaseDef> defs = {
      {"alibi_causal", {[](const Captures&) { return alibi_score_mod(4); }, causal}},
      {"relbias_diffseq",
       {[](const Captures&) -> ScoreMod { return [](Expr s, Expr, Expr, Expr q, Expr kv) { return s + (q - kv); }; }, {}}},
      {"gqa_causal", {{}, causal}},
      {"document_causal_s300",
       {{}, [](const Captures& c) -> MaskMod {
          Captured doc(c.at("doc"), "doc");
          return [doc](Expr, Expr, Expr q, Expr kv) { return (Expr(doc[q]) == Expr(doc[kv])) & (q >= kv); };
        }}},
      {"sliding64_blk64", {{}, [](const Captures&) { return sliding_window_mask(64); }}},
      {"softcap20", {[](const Captures&) { return tanh_softcap_score_mod(20.0); }, {}}},
      {"learnable_relbias_table",
       {[](const Captures& c) -> ScoreMod {
          Captured table(c.at("learn_table"), "learn_table");
          const int64_t S = 192;
          return [table, S](Expr s, Expr, Expr h, Expr q, Expr kv) { return s + table[h][q - kv + (S - 1)]; };
        },
        causal}},
      {"dv_differs", {[](const Captures&) -> ScoreMod { return [](Expr s, Expr, Expr, Expr, Expr) { return s * 2; }; }, {}}},
      {"empty_rows",
       {{}, [](const Captures&) -> MaskMod { return [](Expr, Expr, Expr q, Expr kv) { return (q >= 40) & (kv <= q); }; }}},
      {"kv_batch_broadcast",
       {[](const Captures&) -> ScoreMod { return [](Expr s, Expr, Expr, Expr, Expr) { return s * s; }; }, {}}},
      {"prefix_lm_or", {{}, [](const Captures&) { return prefix_lm_mask(64); }}},
      {"scale_head_offset",
       {[](const Captures& c) -> ScoreMod {
          Captured hoff(c.at("learn_hoff"), "learn_hoff");
          return [hoff](Expr s, Expr, Expr h, Expr, Expr) { return s * hoff[h]; };
        },
        {}}},
      {"and_window_chunk",
       {{}, [](const Captures&) -> MaskMod {
          return and_masks(MaskMod([](Expr, Expr, Expr q, Expr kv) { return abs(q - kv) <= 48; }),
                           MaskMod([](Expr, Expr, Expr q, Expr kv) { return floor_div(q, 100) == floor_div(kv, 100); }));
        }}},
  };
  return defs;
}

std::string path_of(const std::string& dir, const std::string& name, const std::string& what) {
  return (std::filesystem::path(dir) / (name + "." + what + ".npy")).string();
}

// mean |golden - impl| over finite golden entries; -inf golden entries must be -inf in impl.
std::pair<double, std::string> mean_abs_error(const Tensor& golden, const Tensor& impl) {
  if (golden.sizes() != impl.sizes()) {
    return {std::numeric_limits<double>::infinity(),
            fmt::format("shape {} vs golden {}", shape_str(impl.sizes()), shape_str(golden.sizes()))};
  }
  Tensor g = golden.to(kFloat64), x = impl.to(kFloat64);
  Tensor ginf = isinf(g);
  if (any(isnan(x)).item<bool>()) return {std::numeric_limits<double>::quiet_NaN(), "NaN in result"};
  Tensor inf_mismatch = logical_and(ginf, ne(x, g));
  if (any(inf_mismatch).item<bool>()) return {std::numeric_limits<double>::infinity(), "-inf rows differ"};
  Tensor finite = logical_not(ginf);
  double n = sum(finite.to(kFloat64)).item();
  double e = sum(where(finite, abs(g - where(finite, x, 0.0)), 0.0)).item();
  return {n > 0 ? e / n : 0.0, ""};
}

// Compares our BlockMask with PyTorch's: counts, and the first `num` indices of each row (sorted).
ConformanceCheck compare_block_mask(const BlockMask& ours, const std::string& dir, const std::string& name) {
  ConformanceCheck c;
  c.tensor = "block_mask";
  c.passed = true;
  auto same = [&](const Tensor& our_num, const Tensor& our_idx, const std::string& what) {
    Tensor num = load_npy(path_of(dir, name, "block_" + what + "_num"));
    Tensor idx = load_npy(path_of(dir, name, "block_" + what + "_idx"));
    if (!our_num.defined()) {
      if (any(num != 0).item<bool>()) { c.passed = false; c.note += what + ": missing; "; }
      return;
    }
    if (our_num.sizes() != num.sizes() || !equal(our_num.cpu().to(kInt64), num.to(kInt64))) {
      c.passed = false;
      c.note += what + " counts differ; ";
      return;
    }
    auto n = num.to(kInt64).reshape({-1}).to_vector();
    Tensor a = our_idx.cpu().to(kInt64).reshape({static_cast<int64_t>(n.size()), -1});
    Tensor b = idx.to(kInt64).reshape({static_cast<int64_t>(n.size()), -1});
    for (size_t r = 0; r < n.size(); ++r) {
      auto k = static_cast<int64_t>(n[r]);
      if (k == 0) continue;
      auto x = sort(a[static_cast<int64_t>(r)].narrow(0, 0, k)).values, y = sort(b[static_cast<int64_t>(r)].narrow(0, 0, k)).values;
      if (!equal(x, y)) { c.passed = false; c.note += what + " indices differ in row " + std::to_string(r) + "; "; return; }
    }
  };
  same(ours.kv_num_blocks(), ours.kv_indices(), "kv");
  same(ours.full_kv_num_blocks(), ours.full_kv_indices(), "full_kv");
  c.limit = 0;
  return c;
}

// A table a constructor built against the captured tensor PyTorch's script built (cap_X): same shape, and
// equal values for integer and bool tables; float ones are computed in float32 by both, each with its own
// cos and summation order, so they agree to a few float32 roundings: max |ours - theirs| <= 1e-6 (1 + max |theirs|)
// (about 8 ulps of the largest entry; Sandwich's rel_bias is within 1 ulp of PyTorch's).
ConformanceCheck compare_table(const std::string& cap, const Tensor& ours, const Tensor& theirs) {
  ConformanceCheck c;
  c.tensor = "cap_" + cap;
  if (!ours.defined()) {
    c.note = "the constructors built no table '" + cap + "' to hold against it";
    return c;
  }
  if (ours.sizes() != theirs.sizes()) {
    c.note = fmt::format("shape {} vs PyTorch's {}", shape_str(ours.sizes()), shape_str(theirs.sizes()));
    return c;
  }
  Tensor a = ours.cpu().to(kFloat64), b = theirs.to(kFloat64);
  c.err_impl = ours.numel() ? max(abs(a - b)).item() : 0.0;
  if (is_floating(ours.dtype()) || is_floating(theirs.dtype())) {
    c.limit = 1e-6 * (1 + (theirs.numel() ? max(abs(b)).item() : 0.0));
    c.passed = c.err_impl <= c.limit;
  } else {
    c.limit = 0;
    c.passed = c.err_impl == 0;
  }
  if (!c.passed) c.note = fmt::format("max |ours - PyTorch's| = {:.3e}", c.err_impl);
  return c;
}


double json_err(const nlohmann::json& errors, const std::string& key, const std::string& tensor) {
  if (!errors.contains(key) || !errors[key].is_object() || !errors[key].contains(tensor)) return -1;
  if (!errors[key][tensor].is_number()) return -1;  // null: PyTorch produced no value
  return errors[key][tensor].get<double>();
}

// One manifest entry, read and type-checked before any case runs.
struct ManifestCase {
  std::string name;
  const CaseDef* def = nullptr;  // cases without "mod"
  nlohmann::json mod;            // cases with "mod": the gallery spec (null otherwise)
  BlockSize block;
  bool gqa = false;
  std::optional<double> scale;
  nlohmann::json errors;  // {"fp32_ref": {"out": err, ...}, ...}
};

// Checks a "mod" object before any case runs: "mask" / "score" strings naming gallery constructors (at least
// one), nested objects for inner masks, numbers, and "cap_X" strings whose file C.cap_X.npy exists. Returns
// an empty string when it is well formed, else what is wrong.
std::string check_mod(const nlohmann::json& mod, const std::string& dir, const std::string& name) {
  if (!mod.is_object()) return "must be a JSON object, got a JSON " + std::string(mod.type_name());
  for (const char* k : {"mask", "score"}) {
    if (!mod.contains(k)) continue;
    if (!mod[k].is_string()) return fmt::format("\"{}\" must be a string, got {}", k, mod[k].dump());
    const GalleryEntry* e = find_gallery_entry(mod[k].get<std::string>());
    if (!e || e->is_score != (std::string(k) == "score"))
      return fmt::format("\"{}\": {} is not a gallery {} constructor", k, mod[k].dump(), k);
  }
  if (!mod.contains("mask") && !mod.contains("score")) return "names neither a \"mask\" nor a \"score\"";
  for (const auto& [key, v] : mod.items()) {
    if (key == "mask" || key == "score") continue;
    if (v.is_object()) {  // an inner mask (document, batchify)
      std::string inner = check_mod(v, dir, name);
      if (inner.empty() && (!v.contains("mask") || v.contains("score")))
        inner = fmt::format("must name a \"mask\" and no \"score\", got {}", v.dump());
      if (!inner.empty()) return fmt::format("\"{}\": {}", key, inner);
    } else if (v.is_string()) {
      const std::string ref = v.get<std::string>();
      if (ref.rfind("cap_", 0) != 0) return fmt::format("\"{}\": a string must name a captured tensor \"cap_X\", got {}", key, v.dump());
      if (!std::filesystem::exists(path_of(dir, name, ref)))
        return fmt::format("\"{}\": {} names {}, which does not exist", key, v.dump(), path_of(dir, name, ref));
    } else if (!v.is_number()) {
      return fmt::format("\"{}\": must be a number, a \"cap_X\" string or an object, got {}", key, v.dump());
    }
  }
  return "";
}

// A checked "mod" object as a GallerySpec, "cap_X" replaced by the captured tensor X; records the names used.
GallerySpec spec_of(const nlohmann::json& mod, const Captures& caps, std::set<std::string>& used) {
  GallerySpec spec;
  if (mod.contains("mask")) spec.mask = mod["mask"].get<std::string>();
  if (mod.contains("score")) spec.score = mod["score"].get<std::string>();
  for (const auto& [key, v] : mod.items()) {
    if (key == "mask" || key == "score") continue;
    if (v.is_object()) {
      spec.args[key] = std::make_shared<const GallerySpec>(spec_of(v, caps, used));
    } else if (v.is_string()) {
      const std::string cap = v.get<std::string>().substr(4);
      spec.args[key] = caps.at(cap);
      used.insert(cap);
    } else if (v.is_number_integer()) {
      spec.args[key] = v.get<int64_t>();
    } else {
      spec.args[key] = v.get<double>();
    }
  }
  return spec;
}

// The manifest as cases: a non-empty JSON array of objects, each with "case" (a known name), "block"
// (an integer or [q, kv]), "errors" (an object whose entries are objects of numbers, or a string such as
// "FAIL" where PyTorch produced nothing), optional "gqa" (bool) and "scale" (number or null). ValueError naming the file, the entry and the field otherwise.
std::vector<ManifestCase> read_manifest(const nlohmann::json& manifest, const std::string& path, const std::string& dir) {
  FG_CHECK(manifest.is_array(), ValueError, "conformance: {} must hold a JSON array of cases, got a JSON {}", path,
           manifest.type_name());
  FG_CHECK(!manifest.empty(), ValueError, "conformance: {} lists no cases", path);
  std::vector<ManifestCase> cases;
  for (size_t i = 0; i < manifest.size(); ++i) {
    const nlohmann::json& c = manifest[i];
    FG_CHECK(c.is_object(), ValueError, "conformance: {}: entry {} must be a JSON object, got a JSON {}", path, i,
             c.type_name());
    FG_CHECK(c.contains("case") && c["case"].is_string(), ValueError,
             "conformance: {}: entry {} has no string field \"case\"", path, i);
    ManifestCase mc;
    mc.name = c["case"].get<std::string>();
    auto bad = [&](const char* field, const char* expected) {
      const std::string seen = c.contains(field) ? c[field].dump() : std::string("nothing");
      FG_FAIL(ValueError, "conformance: {}: case '{}' (entry {}): field \"{}\" must be {}, got {}", path, mc.name, i,
              field, expected, seen);
    };
    if (c.contains("mod")) {
      const std::string why = check_mod(c["mod"], dir, mc.name);
      if (!why.empty()) bad("mod", fmt::format("a gallery spec (../shared/gallery/README.md); it {}", why).c_str());
      mc.mod = c["mod"];
    } else {
      auto def_it = case_defs().find(mc.name);
      FG_CHECK(def_it != case_defs().end(), ValueError,
               "conformance: unknown case '{}' in {} (it has no \"mod\"; cases known by name: {})", mc.name, path,
               fmt::join(known_conformance_cases(), ", "));
      mc.def = &def_it->second;
    }
    const nlohmann::json* b = c.contains("block") ? &c["block"] : nullptr;
    auto positive_int = [](const nlohmann::json& j) { return j.is_number_integer() && j.get<int64_t>() >= 1; };
    if (b && positive_int(*b)) {
      mc.block = BlockSize((*b).get<int64_t>());
    } else if (b && b->is_array() && b->size() == 2 && positive_int((*b)[0]) && positive_int((*b)[1])) {
      mc.block = BlockSize((*b)[0].get<int64_t>(), (*b)[1].get<int64_t>());
    } else {
      bad("block", "a positive integer or [q, kv] of positive integers");
    }
    if (c.contains("gqa") && !c["gqa"].is_null()) {
      if (!c["gqa"].is_boolean()) bad("gqa", "true or false");
      mc.gqa = c["gqa"].get<bool>();
    }
    if (c.contains("scale") && !c["scale"].is_null()) {
      if (!c["scale"].is_number()) bad("scale", "a number or null");
      mc.scale = c["scale"].get<double>();
    }
    if (!c.contains("errors") || !c["errors"].is_object()) bad("errors", "an object of {\"fp32_ref\": {...}, ...}");
    for (const auto& [key, per_tensor] : c["errors"].items()) {
      bool ok = per_tensor.is_object() || per_tensor.is_null() || per_tensor.is_string();  // "FAIL": PyTorch failed
      if (per_tensor.is_object())
        for (const auto& [t, e] : per_tensor.items()) ok = ok && (e.is_number() || e.is_null());
      if (!ok) bad("errors", fmt::format("an object of objects of numbers (\"{}\" is not)", key).c_str());
    }
    mc.errors = c["errors"];
    cases.push_back(std::move(mc));
  }
  return cases;
}

}  // namespace

bool ConformanceResult::passed() const {
  for (const auto& c : checks) if (!c.passed) return false;
  return !checks.empty();
}

std::vector<std::string> known_conformance_cases() {
  std::vector<std::string> names;
  for (const auto& [n, _] : case_defs()) names.push_back(n);
  return names;
}

std::vector<ConformanceResult> run_conformance(const std::string& dir, const ConformanceOptions& opt) {
  const std::string manifest_path = (std::filesystem::path(dir) / "manifest.json").string();
  std::ifstream f(manifest_path);
  FG_CHECK(f.good(), IOError, "conformance: cannot open {}", manifest_path);
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(f);
  } catch (const std::exception& e) {
    FG_FAIL(IOError, "conformance: {} is not valid JSON: {}", manifest_path, e.what());
  }
  FG_CHECK(opt.dtype == kFloat32 || opt.dtype == kBFloat16 || opt.dtype == kFloat16, DTypeError,
           "conformance: dtype must be float32, bfloat16 or float16, got {}", opt.dtype);
  const std::vector<ManifestCase> cases = read_manifest(manifest, manifest_path, dir);
  // Every case asked for must be in the manifest: a filter that selects nothing checks nothing.
  for (const std::string& want : opt.only) {
    bool found = false;
    for (const ManifestCase& mc : cases) found = found || mc.name == want;
    std::vector<std::string> names;
    for (const ManifestCase& mc : cases) names.push_back(mc.name);
    FG_CHECK(found, ValueError, "conformance: case '{}' is not in {} (its cases: {})", want, manifest_path,
             fmt::join(names, ", "));
  }
  const std::string key = opt.dtype == kFloat32 ? "fp32" : opt.dtype == kBFloat16 ? "bf16" : "fp16";
  const double fudge = opt.dtype == kFloat32 ? 10.0 : 1.1;
  std::vector<ConformanceResult> results;
  for (const ManifestCase& mc : cases) {
    const std::string& name = mc.name;
    if (!opt.only.empty() && std::find(opt.only.begin(), opt.only.end(), name) == opt.only.end()) continue;
    ConformanceResult res;
    res.name = name;
    res.dtype = opt.dtype;
    // Inputs, cast down as PyTorch did; captures (learn_* require grad).
    auto load_in = [&](const std::string& what) {
      return load_npy(path_of(dir, name, what)).to(opt.dtype).to(opt.device).requires_grad_(true);
    };
    Tensor q = load_in("q"), k = load_in("k"), v = load_in("v");
    Tensor dout = load_npy(path_of(dir, name, "do")).to(opt.dtype).to(opt.device);
    Captures caps;  // on the device: what the mods read
    for (const auto& entry : std::filesystem::directory_iterator(dir)) {
      std::string fn = entry.path().filename().string();
      std::string prefix = name + ".cap_";
      if (fn.rfind(prefix, 0) == 0 && fn.size() > prefix.size() + 4) {
        std::string cap = fn.substr(prefix.size(), fn.size() - prefix.size() - 4);
        Tensor t = load_npy(entry.path().string()).to(opt.device);
        if (cap.rfind("learn_", 0) == 0) t.requires_grad_(true);
        caps[cap] = t;
      }
    }
    FlexAttentionOptions o;
    o.return_lse = true;
    o.enable_gqa = mc.gqa;
    o.scale = mc.scale;
    o.kernel.backend = opt.backend;
    MaskMod mask_mod;
    std::vector<ConformanceCheck> table_checks;
    if (mc.def) {
      if (mc.def->score_mod) o.score_mod = mc.def->score_mod(caps);
      if (mc.def->mask_mod) mask_mod = mc.def->mask_mod(caps);
    } else {
      std::set<std::string> passed_in;
      GalleryMods mods = build_gallery_mods(spec_of(mc.mod, caps, passed_in), opt.device);
      o.score_mod = mods.score_mod;
      mask_mod = mods.mask_mod;
      // Captured tensors the mod does not take are PyTorch's copies of tables the constructors build.
      for (const auto& [cap, t] : caps) {
        if (passed_in.count(cap)) continue;
        auto it = mods.tables.find(cap);
        table_checks.push_back(compare_table(cap, it == mods.tables.end() ? Tensor() : it->second, t.cpu()));
      }
    }
    if (!mask_mod) mask_mod = noop_mask;
    // Our create_block_mask on the run's device, checked against PyTorch's BlockMask.
    Tensor ref_num = load_npy(path_of(dir, name, "block_kv_num"));
    BlockMask bm = create_block_mask(mask_mod, ref_num.size(0), ref_num.size(1), q.size(2), k.size(2), mc.block,
                                     opt.device);
    res.checks.push_back(compare_block_mask(bm, dir, name));
    if (!opt.device.is_cpu()) res.checks.back().note += fmt::format("built on {}", opt.device);
    for (auto& t : table_checks) res.checks.push_back(std::move(t));
    o.block_mask = bm;
    FlexAttentionResult r = flex_attention(q, k, v, o);
    (r.out.to(kFloat64) * dout.to(kFloat64)).sum().backward();
    std::vector<std::pair<std::string, Tensor>> outputs{{"out", r.out}, {"lse", r.lse}, {"dq", q.grad()},
                                                        {"dk", k.grad()}, {"dv", v.grad()}};
    for (const auto& [cap, t] : caps) {
      if (cap.rfind("learn_", 0) == 0) outputs.push_back({"d_" + cap, t.grad()});
    }
    const auto& errors = mc.errors;
    for (const auto& [tname, value] : outputs) {
      ConformanceCheck chk;
      chk.tensor = tname;
      std::string gfile = path_of(dir, name, "golden." + tname);
      Tensor golden = load_npy(gfile);
      if (!value.defined()) {
        chk.note = "no value produced";
      } else {
        auto [e, note] = mean_abs_error(golden, value.cpu());
        chk.err_impl = e;
        chk.note = note;
      }
      chk.err_ref = json_err(errors, key + "_ref", tname);
      chk.err_compiled = json_err(errors, key + "_compiled", tname);
      FG_CHECK(chk.err_ref >= 0, ValueError, "conformance: manifest has no {}_ref error for {} of case {}", key, tname, name);
      chk.limit = (1 + fudge) * chk.err_ref + 1e-7;
      chk.passed = value.defined() && chk.note.empty() && chk.err_impl <= chk.limit;
      res.checks.push_back(chk);
    }
    results.push_back(std::move(res));
  }
  return results;
}

std::string format_conformance(const std::vector<ConformanceResult>& results) {
  std::string s = fmt::format("{:<26} {:<9} {:<14} {:>11} {:>11} {:>11} {:>11} {:>8}  {}\n", "case", "dtype", "tensor",
                              "ours", "torch_ref", "torch_fused", "limit", "ours/fus", "result");
  int passed = 0, failed = 0;
  for (const auto& r : results) {
    for (const auto& c : r.checks) {
      if (c.tensor.rfind("cap_", 0) == 0) {
        s += fmt::format("{:<26} {:<9} {:<14} {:>11.3e} {:>11} {:>11} {:>11.3e} {:>8}  {}{}\n", r.name, dtype_name(r.dtype),
                         c.tensor, c.err_impl, "", "", c.limit, "", c.passed ? "table same as PyTorch's" : "DIFFERS: ", c.note);
        continue;
      }
      if (c.tensor == "block_mask") {
        s += fmt::format("{:<26} {:<9} {:<14} {:>11} {:>11} {:>11} {:>11} {:>8}  {}{}\n", r.name, dtype_name(r.dtype),
                         c.tensor, "", "", "", "", "", c.passed ? "same as PyTorch" : "DIFFERS: ", c.note.empty() || !c.passed ? c.note : " (" + c.note + ")");
        continue;
      }
      std::string ratio = c.err_compiled > 0 ? fmt::format("{:.2f}", c.err_impl / c.err_compiled) : "n/a";
      std::string fused = c.err_compiled >= 0 ? fmt::format("{:.3e}", c.err_compiled) : "FAIL";
      s += fmt::format("{:<26} {:<9} {:<14} {:>11.3e} {:>11.3e} {:>11} {:>11.3e} {:>8}  {}{}\n", r.name, dtype_name(r.dtype),
                       c.tensor, c.err_impl, c.err_ref, fused, c.limit, ratio, c.passed ? "pass" : "FAIL ", c.note);
    }
    (r.passed() ? passed : failed)++;
  }
  s += fmt::format("{} passed, {} failed\n", passed, failed);
  return s;
}

}  // namespace fg
