// See shared_library.h.
#include "flexgrad/tensor/cuda/shared_library.h"

#include <dlfcn.h>

namespace fg::cuda {

SharedLibrary::SharedLibrary(const std::vector<std::string>& files) {
  for (const std::string& f : files) {
    handle_ = dlopen(f.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle_) {
      file_ = f;
      why_.clear();
      return;
    }
    const char* e = dlerror();
    why_ += (why_.empty() ? "" : "; ") + (e ? std::string(e) : f + ": unknown error");
  }
  if (files.empty()) why_ = "no file to open";
}

void* SharedLibrary::symbol(const char* name) const { return handle_ ? dlsym(handle_, name) : nullptr; }

}  // namespace fg::cuda
