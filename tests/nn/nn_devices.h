// The nn suites run once per device: TEST_P over a fixture derived from NnDeviceTest, instantiated with
// FG_NN_INSTANTIATE_DEVICES(Fixture). The CUDA instance skips visibly where no GPU is present.
#pragma once
#include "tests/test_util.h"

namespace fg::testing {

class NnDeviceTest : public ::testing::TestWithParam<DeviceType> {
 protected:
  void SetUp() override {
    if (GetParam() == DeviceType::CUDA && device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device";
  }
  Device dev() const { return Device(GetParam(), 0); }
  bool on_cuda() const { return GetParam() == DeviceType::CUDA; }
};

inline std::string nn_device_name(const ::testing::TestParamInfo<DeviceType>& info) {
  return info.param == DeviceType::CUDA ? "cuda" : "cpu";
}

#define FG_NN_INSTANTIATE_DEVICES(Fixture)                                                                 \
  INSTANTIATE_TEST_SUITE_P(Devices, Fixture, ::testing::Values(::fg::DeviceType::CPU, ::fg::DeviceType::CUDA), \
                           ::fg::testing::nn_device_name)

}  // namespace fg::testing
