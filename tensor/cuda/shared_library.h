// A shared library opened with dlopen at run time rather than linked, and its entry points: for the CUDA
// libraries that cost every process to load (cuBLAS: cublas_library.h) or that a machine may lack (cuDNN:
// attention/cuda/cudnn_sdpa.cpp).
#pragma once
#include <string>
#include <vector>

namespace fg::cuda {

class SharedLibrary {
 public:
  // Opens the first of `files` that dlopen (RTLD_NOW | RTLD_LOCAL) can, searched as dlopen searches (the
  // caller's run path included). The library stays loaded for the life of the process.
  explicit SharedLibrary(const std::vector<std::string>& files);

  bool is_open() const { return handle_ != nullptr; }
  const std::string& file() const { return file_; }  // the file opened
  // Why no file could be opened: dlerror's message for each (each names its file), joined by "; ".
  const std::string& why() const { return why_; }

  // Sets `fn` to the entry point `name` (nullptr when the library has none) and says whether it was found.
  template <class Fn> bool find(Fn& fn, const char* name) const {
    fn = reinterpret_cast<Fn>(symbol(name));
    return fn != nullptr;
  }

 private:
  void* symbol(const char* name) const;

  void* handle_ = nullptr;
  std::string file_;
  std::string why_;
};

}  // namespace fg::cuda
