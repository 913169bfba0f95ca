#include "flexgrad/ops/cpu/blas_threads.h"

#include <cblas.h>

namespace fg::cpu {

void use_single_threaded_blas() {
  static const bool once = [] {
    openblas_set_num_threads(1);
    return true;
  }();
  (void)once;
}

}  // namespace fg::cpu
