// FG_HOST_DEVICE marks an inline function that host code and CUDA kernels both call (one definition for
// both devices); it is empty where the compiler is not nvcc.
#pragma once

#if defined(__CUDACC__)
#define FG_HOST_DEVICE __host__ __device__
#else
#define FG_HOST_DEVICE
#endif
