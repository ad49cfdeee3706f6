// The fused step's loops for avx2 (compile options in CMakeLists.txt); see step_simd.h.
#define LARGEBATCH_SIMD_NAME "avx2"
#define LARGEBATCH_SIMD_KERNELS avx2_kernels
#include "step_simd_kernels.inc"
