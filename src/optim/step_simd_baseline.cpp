// The fused step's loops for baseline (compile options in CMakeLists.txt); see step_simd.h.
#define LARGEBATCH_SIMD_NAME "baseline"
#define LARGEBATCH_SIMD_KERNELS baseline_kernels
#include "step_simd_kernels.inc"
