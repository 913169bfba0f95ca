// cuBLAS opened at run time (tensor/cuda/cublas_library.h): the library links no libcublas (whose static
// initialisers cost every process ~0.4 s), finds it when asked, and names the files it tried when it cannot.
// None of this needs a GPU: it runs wherever flexgrad was built with CUDA.
#include <gtest/gtest.h>

#include <link.h>

#include <string>
#include <vector>

#include "tests/test_util.h"
#ifdef FLEXGRAD_WITH_CUDA
#include "flexgrad/tensor/cuda/cublas_library.h"
#endif

namespace fg {
namespace {

#ifdef FLEXGRAD_WITH_CUDA

TEST(CublasLibrary, OpensAndFindsEveryEntryPoint) {
  const cuda::CublasLibrary& lib = cuda::cublas();
  EXPECT_NE(lib.create, nullptr);
  EXPECT_NE(lib.set_stream, nullptr);
  EXPECT_NE(lib.gemm_ex, nullptr);
  EXPECT_NE(lib.gemm_strided_batched_ex, nullptr);
  EXPECT_NE(lib.gemm_batched_ex, nullptr);
  // The status names come from the library itself (no GPU involved).
  EXPECT_STREQ(lib.status_name(CUBLAS_STATUS_NOT_INITIALIZED), "CUBLAS_STATUS_NOT_INITIALIZED");
  EXPECT_STREQ(lib.status_name(CUBLAS_STATUS_INVALID_VALUE), "CUBLAS_STATUS_INVALID_VALUE");
  EXPECT_EQ(&cuda::cublas(), &lib) << "opened once";
}

TEST(CublasLibrary, MissingFilesAreEachNamedWithTheReason) {
  EXPECT_THROW_MSG(cuda::open_cublas({"/nonexistent/libcublas.so.13", "libcublas_no_such_soname.so"}), CudaError,
                   "cuBLAS cannot be loaded (/nonexistent/libcublas.so.13: ", "No such file",
                   "; libcublas_no_such_soname.so: ", "FLEXGRAD_CUBLAS_LIBRARY");
  EXPECT_THROW_MSG(cuda::open_cublas({}), CudaError, "cuBLAS cannot be loaded (no file to open)");
}

TEST(CublasLibrary, ALibraryWithoutTheEntryPointsIsRejected) {
  EXPECT_THROW_MSG(cuda::open_cublas({"libm.so.6"}), CudaError, "libm.so.6 has no symbol cublasCreate_v2");
}

TEST(CublasLibrary, TheFirstFileThatOpensIsUsed) {
  const cuda::CublasLibrary lib = cuda::open_cublas({"/nonexistent/libcublas.so.13", "libcublas.so.13"});
  EXPECT_STREQ(lib.status_name(CUBLAS_STATUS_SUCCESS), "CUBLAS_STATUS_SUCCESS");
}

// The DT_NEEDED entries of the loaded object whose path contains `object` (read from its dynamic section in
// memory, where the loader has already relocated DT_STRTAB to an address).
std::vector<std::string> needed_libraries(const std::string& object) {
  struct Search {
    std::string object;
    std::vector<std::string> needed;
    bool found = false;
  } search{object, {}, false};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) {
        auto* s = static_cast<Search*>(data);
        if (!info->dlpi_name || std::string(info->dlpi_name).find(s->object) == std::string::npos) return 0;
        s->found = true;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          if (info->dlpi_phdr[i].p_type != PT_DYNAMIC) continue;
          const auto* dyn = reinterpret_cast<const ElfW(Dyn)*>(info->dlpi_addr + info->dlpi_phdr[i].p_vaddr);
          const char* strtab = nullptr;
          for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL; ++d)
            if (d->d_tag == DT_STRTAB) strtab = reinterpret_cast<const char*>(d->d_un.d_ptr);
          for (const ElfW(Dyn)* d = dyn; d->d_tag != DT_NULL && strtab; ++d)
            if (d->d_tag == DT_NEEDED) s->needed.emplace_back(strtab + d->d_un.d_val);
        }
        return 1;
      },
      &search);
  if (!search.found) ADD_FAILURE() << object << " is not loaded in the test process";
  return search.needed;
}

TEST(CublasLibrary, LibflexgradDoesNotLinkCublas) {
  const std::vector<std::string> needed = needed_libraries("libflexgrad.so");
  std::string all;
  for (const std::string& n : needed) all += n + " ";
  EXPECT_NE(all.find("libcudart"), std::string::npos) << "the reading of DT_NEEDED is broken: " << all;
  EXPECT_EQ(all.find("libcublas"), std::string::npos) << "libflexgrad.so links cuBLAS again: " << all;
}

#else
TEST(CublasLibrary, NeedsACudaBuild) { GTEST_SKIP() << "flexgrad was built without CUDA"; }
#endif

}  // namespace
}  // namespace fg
