// flexgrad_conformance DIR [--dtype float32|bfloat16|float16] [--device cpu|cuda] [--backend auto|fused|reference]
// Runs a directory of PyTorch FlexAttention reference results (../shared/conformance, ../shared/gallery: a case
// with a manifest "mod" gets its mods from the gallery constructors, tools/conformance/conformance.h) and
// prints a table and "N passed, N failed".
#include <CLI/CLI.hpp>
#include <cstdio>

#include "tools/conformance/conformance.h"

int main(int argc, char** argv) {
  CLI::App app{"Check flex_attention against PyTorch's reference results"};
  std::string dir, dtype = "float32", device = "cpu", backend = "auto";
  std::vector<std::string> only;
  app.add_option("dir", dir, "directory with manifest.json and the case .npy files")->required();
  app.add_option("--dtype", dtype, "float32, bfloat16 or float16")->check(CLI::IsMember({"float32", "bfloat16", "float16"}));
  app.add_option("--device", device, "cpu or cuda[:N]");
  app.add_option("--backend", backend, "auto, fused or reference")->check(CLI::IsMember({"auto", "fused", "reference"}));
  app.add_option("--case", only, "run only these cases");
  CLI11_PARSE(app, argc, argv);
  try {
    fg::ConformanceOptions o;
    o.dtype = dtype == "float32" ? fg::kFloat32 : dtype == "bfloat16" ? fg::kBFloat16 : fg::kFloat16;
    o.device = fg::Device::parse(device);
    o.backend = backend == "fused" ? fg::FlexBackend::Fused : backend == "reference" ? fg::FlexBackend::Reference : fg::FlexBackend::Auto;
    o.only = only;
    std::printf("flex_attention on %s (backend %s) against %s\n", o.device.str().c_str(), backend.c_str(), dir.c_str());
    auto results = fg::run_conformance(dir, o);
    std::fputs(fg::format_conformance(results).c_str(), stdout);
    for (const auto& r : results) if (!r.passed()) return 1;
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "flexgrad_conformance: %s\n", e.what());
    return 2;
  }
}
