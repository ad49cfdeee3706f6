// The fused step's loops for baseline (compile options in CMakeLists.txt); see step_simd.h.
#include "step_simd.h"

#define LARGEBATCH_SIMD_NAME "baseline"

namespace largebatch {
namespace optim {
namespace detail {
namespace simd {
namespace {
#include "step_simd_kernels.inc"
}  // namespace

extern const Kernels baseline_kernels = kernels_here;

}  // namespace simd
}  // namespace detail
}  // namespace optim
}  // namespace largebatch
