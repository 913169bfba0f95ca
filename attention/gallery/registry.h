// The gallery by name: every constructor of attention/gallery/ reachable from its name and named
// parameters, so a data set (the conformance harness reads them from a manifest's "mod", tools/conformance)
// or a command line (examples/mask_gallery.cpp) builds any of them with any parameters. The names and
// parameters are those of ../shared/gallery/README.md.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "flexgrad/attention/expr.h"

namespace fg {

struct GallerySpec;
// A parameter value: an integer, a number, a tensor, or an inner mask (document, batchify).
using GalleryValue = std::variant<int64_t, double, Tensor, std::shared_ptr<const GallerySpec>>;

// What to build: a mask constructor and/or a score constructor, and the parameters of both by name (one
// flat set, as a manifest's "mod" object; a name both use gets the same value).
struct GallerySpec {
  std::string mask;   // empty: no mask_mod
  std::string score;  // empty: no score_mod
  std::map<std::string, GalleryValue> args;
};

enum class GalleryParamKind { Int, Float, IntTensor, BoolTensor, FloatTensor, Mask };
const char* gallery_param_kind_name(GalleryParamKind k);  // "int", "float", "int tensor", ...

struct GalleryParam {
  std::string name;
  GalleryParamKind kind;
  std::string help;
};

struct GalleryEntry {
  std::string name;  // "natten", "sandwich", ...
  bool is_score = false;
  std::vector<GalleryParam> params;
  std::string summary;  // one line: the definition and its source
};

// Every constructor, masks first, in the order of ../shared/gallery/README.md.
const std::vector<GalleryEntry>& gallery_entries();
// nullptr when no constructor has that name.
const GalleryEntry* find_gallery_entry(const std::string& name);

struct GalleryMods {
  MaskMod mask_mod;    // empty when the spec names no mask
  ScoreMod score_mod;  // empty when the spec names no score
  // The tables the constructors built, named as the data set names them: "doc" (document ids), "dist"
  // (Graphormer distances), "rel_bias" and "head_scale" (Sandwich).
  std::map<std::string, Tensor> tables;
  std::string description;  // "document(offsets=int64[0, 100, 260, 300, 512], inner=sliding_window(window=48))"
};

// Builds the spec's mods; tables that are not built from given tensors (Sandwich's) go to `device`.
// ValueError naming the constructor and the parameter for an unknown name, a missing, unexpected or
// ill-typed parameter (and whatever the constructor itself rejects).
GalleryMods build_gallery_mods(const GallerySpec& spec, Device device = kCPU);

// "name(p=v, ...)" for printing a spec (tensors of up to 16 elements by value, larger ones by shape).
std::string describe_gallery_spec(const GallerySpec& spec);

}  // namespace fg
