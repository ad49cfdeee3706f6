#pragma once
// The element loops of the fused CPU step (step_kernels.cpp), compiled once per instruction set
// (step_simd_baseline.cpp, step_simd_avx2.cpp, step_simd_avx512.cpp) and chosen at run time, so that one
// portable binary uses the widest vectors the CPU has.
//
// Every variant gives bit-identical results: no contraction into FMA (-ffp-contract=off), IEEE operations
// only (+, *, /, sqrt are correctly rounded at any vector width), and sums kept in kLanes fixed lanes added in a
// fixed order, whatever the vector width.
//
// Kept free of every header but <cstdint>, and the structs trivial: the instruction-set files must not emit
// inline functions (constructors, library templates) that the linker could pick for the rest of the program.
#include <cstdint>

namespace largebatch {
namespace optim {
namespace detail {
namespace simd {

constexpr int kLanes = 8;

// How weight decay enters a tensor's step: not at all, as wd w added to the direction, or as w (1 - lr wd) before
// the rest of the step.
enum DecayMode : int { kNoDecay = 0, kCoupledDecay = 1, kDecoupledDecay = 2 };

// One tensor's pointers and coefficients, in its element type. Value-initialise (Plan<T> p{}) before filling.
template <typename T>
struct Plan {
  T* w;
  const T* g;
  T* mu;  // momentum buffer (kMomentum with momentum != 0)
  T* m;   // Adam moments (kAdam)
  T* v;
  int64_t n;
  DecayMode decay;
  bool adam, adapt, momentum, first, nesterov;
  bool scaled;  // the gradient is divided by grad_divisor (global pre-normalisation)
  T wd, beta1, one_minus_beta1, beta2, one_minus_beta2, bc1, bc2, eps, mom, neg_lr;
  T keep;          // 1 - lr wd: decoupled decay's factor
  T grad_divisor;  // max(1, global norm / max_grad_norm)
  T ratio;
};

// Sums over a range: |w|^2, |d|^2, |u|^2, |g|^2.
struct Sums {
  double w, d, u, g;
};

// Pass 1 of elements [begin, end): norms (and LAMB's moments, updated in place). Pass 2: the update. Squares: the
// sum of g^2 over [begin, end) of one gradient (the global norm of the pre-normalisation).
struct Kernels {
  const char* name;
  double (*squares_float)(const float* g, int64_t begin, int64_t end);
  double (*squares_double)(const double* g, int64_t begin, int64_t end);
  Sums (*first_pass_float)(const Plan<float>&, int64_t begin, int64_t end);
  void (*second_pass_float)(const Plan<float>&, int64_t begin, int64_t end);
  Sums (*first_pass_double)(const Plan<double>&, int64_t begin, int64_t end);
  void (*second_pass_double)(const Plan<double>&, int64_t begin, int64_t end);
};

extern const Kernels baseline_kernels;
#ifdef LARGEBATCH_SIMD_AVX2
extern const Kernels avx2_kernels;
#endif
#ifdef LARGEBATCH_SIMD_AVX512
extern const Kernels avx512_kernels;
#endif

}  // namespace simd
}  // namespace detail
}  // namespace optim
}  // namespace largebatch
