// The run-time compiler's cache (attention/cuda/jit.h): a second request compiles nothing, the disk cache
// serves a fresh process, a failed compile names the kept source, and a compiled kernel really runs.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

#include "flexgrad/ops/ops.h"
#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/attention/cuda/jit.h"
#include "flexgrad/tensor/cuda/cuda_api.h"
#endif

namespace fg {
namespace {

#ifdef FLEXGRAD_WITH_CUDA

class JitCache : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device_count(DeviceType::CUDA) == 0) GTEST_SKIP() << "no CUDA device present: skipping the JIT cache tests";
  }
};

// A kernel source that no other test (or earlier run) has compiled: the nonce is in the text, so in the key.
cuda::jit::JitSource axpy_source(const std::string& nonce) {
  cuda::jit::JitSource s;
  s.name = "jit_test_axpy";
  s.kernels = {"fg_test_axpy"};
  s.code = "// nonce " + nonce + "\n" +
           "extern \"C\" __global__ void fg_test_axpy(float a, const float* x, float* y, int n) {\n"
           "  int i = blockIdx.x * blockDim.x + threadIdx.x;\n"
           "  if (i < n) y[i] = a * x[i] + y[i];\n"
           "}\n";
  return s;
}

std::string fresh_dir(const char* tag) {
  auto dir = std::filesystem::temp_directory_path() /
             (std::string("fg_jit_") + tag + "_" + std::to_string(std::chrono::steady_clock::now().time_since_epoch().count()));
  std::filesystem::create_directories(dir);
  return dir.string();
}

TEST_F(JitCache, CompilesOnceThenServesFromMemoryAndRuns) {
  ::setenv("FLEXGRAD_CACHE_DIR", fresh_dir("mem").c_str(), 1);
  cuda::jit::clear_memory_cache();
  cuda::jit::reset_stats();
  const auto src = axpy_source("mem" + std::to_string(std::rand()));
  auto m1 = cuda::jit::get_module(src, 0);
  auto s1 = cuda::jit::stats();
  EXPECT_EQ(s1.compiles, 1u);
  EXPECT_GT(s1.compile_seconds, 0.0);
  auto m2 = cuda::jit::get_module(src, 0);
  auto s2 = cuda::jit::stats();
  EXPECT_EQ(s2.compiles, 1u) << "the second request must compile nothing";
  EXPECT_EQ(s2.memory_hits, 1u);
  EXPECT_EQ(m1.get(), m2.get());

  // The kernel computes what it says: y = 2 x + y.
  const int n = 1000;
  Tensor x = arange(0, n, 1, kFloat32).to(kCUDA), y = full({n}, 1.0, kFloat32).to(kCUDA);
  float a = 2.0f;
  const void* xp = x.data_ptr();
  void* yp = y.data_ptr();
  int nn = n;
  void* args[] = {&a, &xp, &yp, &nn};
  cuda::jit::launch(m1->function("fg_test_axpy"), {(n + 255) / 256}, {256}, 0, args, 0);
  auto out = y.cpu().to_vector();
  for (int i = 0; i < n; i += 97) EXPECT_EQ(out[i], 2.0 * i + 1.0);
}

TEST_F(JitCache, DiskCacheServesAFreshProcess) {
  const std::string dir = fresh_dir("disk");
  ::setenv("FLEXGRAD_CACHE_DIR", dir.c_str(), 1);
  cuda::jit::clear_memory_cache();
  cuda::jit::reset_stats();
  const std::string nonce = "disk" + std::to_string(std::rand());
  cuda::jit::get_module(axpy_source(nonce), 0);
  ASSERT_EQ(cuda::jit::stats().compiles, 1u);
  EXPECT_EQ(cuda::jit::cache_dir(), dir);
  size_t cubins = 0;
  for (auto& e : std::filesystem::directory_iterator(dir)) cubins += e.path().extension() == ".cubin";
  EXPECT_EQ(cubins, 1u);

  // Same process, memory forgotten: the disk answers.
  cuda::jit::clear_memory_cache();
  cuda::jit::get_module(axpy_source(nonce), 0);
  EXPECT_EQ(cuda::jit::stats().compiles, 1u);
  EXPECT_EQ(cuda::jit::stats().disk_hits, 1u);

  // A second process (this binary, one test) must load from disk and compile nothing.
  const std::string cmd = "FG_JIT_CHILD_NONCE=" + nonce + " /proc/" + std::to_string(::getpid()) +
                          "/exe --gtest_filter=JitCache.ChildProcessHitsDisk --gtest_brief=1 > /dev/null 2>&1";
  EXPECT_EQ(std::system(cmd.c_str()), 0) << "the child process did not load the module from disk: " << cmd;
}

// Runs only as the child of DiskCacheServesAFreshProcess.
TEST_F(JitCache, ChildProcessHitsDisk) {
  const char* nonce = std::getenv("FG_JIT_CHILD_NONCE");
  if (!nonce) GTEST_SKIP() << "run by DiskCacheServesAFreshProcess only";
  cuda::jit::get_module(axpy_source(nonce), 0);
  EXPECT_EQ(cuda::jit::stats().compiles, 0u);
  EXPECT_EQ(cuda::jit::stats().disk_hits, 1u);
}

TEST_F(JitCache, FailedCompileNamesTheKeptSource) {
  ::setenv("FLEXGRAD_CACHE_DIR", fresh_dir("fail").c_str(), 1);
  cuda::jit::clear_memory_cache();
  cuda::jit::JitSource bad;
  bad.name = "jit_test_broken";
  bad.kernels = {"k"};
  bad.code = "extern \"C\" __global__ void k() { this is not cuda; }\n";
  try {
    cuda::jit::get_module(bad, 0);
    ADD_FAILURE() << "a broken source compiled";
  } catch (const Error& e) {
    std::string msg = e.what();
    auto at = msg.find("generated source kept at ");
    ASSERT_NE(at, std::string::npos) << msg;
    std::string path = msg.substr(at + 25, msg.find('\n', at) - at - 25);
    EXPECT_TRUE(std::filesystem::exists(path)) << path;
    std::ifstream f(path);
    std::string text((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    EXPECT_EQ(text, bad.code);
  }
}

TEST_F(JitCache, UnknownKernelNameIsAnError) {
  cuda::jit::JitSource s = axpy_source("unknown");
  s.kernels = {"no_such_kernel"};
  fg::testing::expect_error<Error>([&] { cuda::jit::get_module(s, 0); }, "no_such_kernel");
}

#else
TEST(JitCache, NotBuiltWithCuda) { GTEST_SKIP() << "flexgrad built without CUDA: no run-time compiler"; }
#endif

}  // namespace
}  // namespace fg
