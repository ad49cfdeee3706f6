// The fused step's loops for avx512 (compile options in CMakeLists.txt); see step_simd.h.
#define LARGEBATCH_SIMD_NAME "avx512"
#define LARGEBATCH_SIMD_KERNELS avx512_kernels
#include "step_simd_kernels.inc"
