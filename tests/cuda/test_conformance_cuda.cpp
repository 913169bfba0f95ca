// ../shared/conformance and ../shared/gallery (PyTorch 2.11's own FlexAttention results) on the GPU: every case
// passes the upstream acceptance rule in float32 and bfloat16 through the default backend (the CUDA fused
// kernels), with the inputs, the captured tensors, the gallery constructors' tables and the BlockMask on the
// device, and every BlockMask equal to PyTorch's. Skips visibly without a GPU or without the data.
#include <cstdlib>
#include <filesystem>

#include "tools/conformance/conformance.h"
#include "tests/test_util.h"

namespace fg {
namespace {

class ConformanceCuda : public ::testing::TestWithParam<DType> {};

TEST_P(ConformanceCuda, EveryCasePassesPyTorchsRule) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the GPU conformance run";
  if (!std::filesystem::exists(fg::testing::conformance_dir() + "/manifest.json")) GTEST_SKIP() << "no conformance data at " << fg::testing::conformance_dir();
  ConformanceOptions o;
  o.dtype = GetParam();
  o.device = Device(DeviceType::CUDA, 0);
  auto results = run_conformance(fg::testing::conformance_dir(), o);
  EXPECT_EQ(results.size(), 13u);
  for (const auto& r : results) EXPECT_TRUE(r.passed()) << format_conformance({r});
  std::printf("%s", format_conformance(results).c_str());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, ConformanceCuda, ::testing::Values(kFloat32, kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

class GalleryConformanceCuda : public ::testing::TestWithParam<DType> {};

TEST_P(GalleryConformanceCuda, EveryCasePassesPyTorchsRule) {
  if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the GPU gallery run";
  if (!std::filesystem::exists(fg::testing::gallery_dir() + "/manifest.json")) GTEST_SKIP() << "no gallery data at " << fg::testing::gallery_dir();
  ConformanceOptions o;
  o.dtype = GetParam();
  o.device = Device(DeviceType::CUDA, 0);
  auto results = run_conformance(fg::testing::gallery_dir(), o);
  EXPECT_EQ(results.size(), 12u);
  for (const auto& r : results) EXPECT_TRUE(r.passed()) << format_conformance({r});
  std::printf("%s", format_conformance(results).c_str());
}

INSTANTIATE_TEST_SUITE_P(Dtypes, GalleryConformanceCuda, ::testing::Values(kFloat32, kBFloat16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace fg
