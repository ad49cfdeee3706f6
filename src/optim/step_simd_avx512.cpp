// The fused step's loops for avx512 (compile options in CMakeLists.txt); see step_simd.h.
#include "step_simd.h"

#define LARGEBATCH_SIMD_NAME "avx512"

namespace largebatch {
namespace optim {
namespace detail {
namespace simd {
namespace {
#include "step_simd_kernels.inc"
}  // namespace

extern const Kernels avx512_kernels = kernels_here;

}  // namespace simd
}  // namespace detail
}  // namespace optim
}  // namespace largebatch
