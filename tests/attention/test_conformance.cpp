// Every case of ../shared/conformance (PyTorch 2.11's own FlexAttention results) must pass the upstream
// acceptance rule, and every BlockMask must equal the one PyTorch built.
#include <filesystem>
#include <fstream>

#include "tools/conformance/conformance.h"
#include "tests/test_util.h"

namespace fg {
namespace {

class Conformance : public ::testing::TestWithParam<std::pair<DType, FlexBackend>> {};

TEST_P(Conformance, EveryCasePassesPyTorchsRule) {
  if (!std::filesystem::exists(fg::testing::conformance_dir() + "/manifest.json")) GTEST_SKIP() << "no conformance data at " << fg::testing::conformance_dir();
  ConformanceOptions o;
  o.dtype = GetParam().first;
  o.backend = GetParam().second;
  auto results = run_conformance(fg::testing::conformance_dir(), o);
  EXPECT_EQ(results.size(), 13u);
  for (const auto& r : results) {
    EXPECT_TRUE(r.passed()) << format_conformance({r});
  }
  std::printf("%s", format_conformance(results).c_str());
}

INSTANTIATE_TEST_SUITE_P(FusedAndReference, Conformance,
                         ::testing::Values(std::pair{kFloat32, FlexBackend::Fused}, std::pair{kBFloat16, FlexBackend::Fused},
                                           std::pair{kFloat32, FlexBackend::Reference}),
                         [](const auto& info) {
                           return std::string(dtype_name(info.param.first)) +
                                  (info.param.second == FlexBackend::Reference ? "_reference" : "_fused");
                         });

TEST(ConformanceRunner, UnknownCaseAndMissingDirAreClearErrors) {
  EXPECT_THROW_MSG(run_conformance("/nonexistent/dir"), IOError, "cannot open", "/nonexistent/dir/manifest.json");
  namespace fs = std::filesystem;
  const fs::path tmp = fg::testing::scratch_path("conformance_unknown");
  fs::create_directories(tmp);
  { std::ofstream(tmp / "manifest.json") << R"([{"case": "not_a_case", "block": 128, "errors": {}}])"; }
  EXPECT_THROW_MSG(run_conformance(tmp.string()), ValueError, "unknown case 'not_a_case'", "alibi_causal");
}

}  // namespace
}  // namespace fg
