// Runs a directory of PyTorch FlexAttention reference results (the format of ../shared/conformance:
// manifest.json + per-case .npy files) through flex_attention and applies the upstream acceptance rule:
//   err_impl = mean |golden - impl|  <=  (1 + fudge) * err_ref + 1e-7,  fudge 10 (fp32), 1.1 (bf16/fp16)
// for out, lse (finite entries; -inf rows must match), dq, dk, dv and the gradients of learnable captures.
// A case's mods come from its manifest entry's "mod" when it has one (a gallery constructor and its
// parameters, attention/gallery/registry.h; "cap_X" strings name the case's captured tensors, any parameters
// work), else from its name (the PyTorch definitions of ../shared/conformance/README.md); an unknown name is
// an error. A captured tensor the "mod" does not pass in must equal the table of that name the constructors
// built ("doc", "dist", "rel_bias", ...): a "cap_X" check row.
//
// A tool, not part of libflexgrad: it is its own library (flexgrad_conformance_lib) so that JSON parsing
// stays out of the core library's dependencies.
#pragma once
#include <string>
#include <vector>

#include "flexgrad/attention/flex_attention.h"

namespace fg {

struct ConformanceCheck {
  std::string tensor;        // "out", "lse", "dq", ..., "block_mask", "cap_doc" (a constructor's table)
  double err_impl = 0;       // mean |golden - ours|
  double err_ref = 0;        // PyTorch's unfused error in this dtype
  double err_compiled = -1;  // PyTorch's fused-kernel error (-1 when PyTorch failed the case)
  double limit = 0;
  bool passed = false;
  std::string note;
};

struct ConformanceResult {
  std::string name;
  DType dtype = kFloat32;
  std::vector<ConformanceCheck> checks;
  bool passed() const;
};

struct ConformanceOptions {
  DType dtype = kFloat32;
  Device device = kCPU;
  FlexBackend backend = FlexBackend::Auto;
  std::vector<std::string> only;  // run just these cases (all when empty)
};

// Names of the case definitions flexgrad knows.
std::vector<std::string> known_conformance_cases();
// Runs every case of the manifest, or those of options.only. The whole manifest is checked first:
// IOError for a missing or unparsable file, ValueError naming the file, the entry and the field for an
// empty manifest, a malformed entry (a "mod" naming an unknown constructor or a missing cap file included),
// an unknown case name or an options.only name the manifest lacks.
std::vector<ConformanceResult> run_conformance(const std::string& dir, const ConformanceOptions& options = {});
// A table, one row per check, and a final "N passed, N failed" line.
std::string format_conformance(const std::vector<ConformanceResult>& results);

}  // namespace fg
