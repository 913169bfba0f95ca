// How flexgrad runs OpenBLAS: single-threaded, inside its own OpenMP work split. OpenBLAS's thread pool
// and the OpenMP team of the other kernels used to fight over the cores (perf: ~23% of cycles in
// sched_yield on 2 cores). The setting is process-wide; every CPU kernel calling BLAS calls this first.
#pragma once

namespace fg::cpu {

void use_single_threaded_blas();

}  // namespace fg::cpu
