// Scratch files of a test process: one folder of its own, removed by the shared main (tests/test_main.cpp)
// when every test of the process passed, kept for a look when one failed.
//
// ctest runs every test as a process of its own, two at a time on CI, so a file name shared by two tests (or
// two runs of the suite) in one folder would be written by one while the other reads it.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <filesystem>
#include <string>

namespace fg::testing {

inline std::filesystem::path scratch_dir() {
  return std::filesystem::path(::testing::TempDir()) / ("flexgrad_test_" + std::to_string(::getpid()));
}

// A path for the scratch file (or folder) `name`; the process's folder is created on the first call.
inline std::string scratch_path(const std::string& name) {
  std::filesystem::create_directories(scratch_dir());
  return (scratch_dir() / name).string();
}

}  // namespace fg::testing
