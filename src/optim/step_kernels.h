#pragma once
// The two ways the layer-wise engine applies one step (private to the library):
//  - fused_step: CPU, dense contiguous float/double tensors, in blocks of whole tensors sized to the caches.
//    Per block: one pass computes every norm (partial sums per fixed-size chunk, added in chunk order, so
//    results do not depend on the thread count or the blocking), the ratios are formed on the host (the norms
//    already are host numbers: no synchronisation), and a second pass, while the block is still cached, reads
//    each element of w, g and the state and writes w and the state once. The element loops are compiled per
//    instruction set (step_simd.h) with bit-identical results.
//  - tensor_ops_step: per-tensor LibTorch operations, any device; never reads a value on the host.
// Both follow docs/algorithms.md; trust_ratio() below is the one formula both use.
#include <largebatch/optim/layerwise.h>

#include <torch/types.h>

#include <vector>

namespace largebatch {
namespace optim {
namespace detail {

struct StepEntry {
  torch::Tensor param;
  torch::Tensor grad;
  LayerwiseParamState* state = nullptr;
  const LayerwiseOptions* options = nullptr;
  int64_t t = 0;     // updates applied to this tensor before this step
  double phi = 1;    // phi_t of this tensor
  bool adapt = false;  // adapted at this step (the mask, and always_adapt with the group's weight decay)
  double lr = 0;       // this tensor's learning rate: the group's, times lr_ratio_1d when not adapted
  // Global pre-normalisation: the gradient is divided by this (host value for the fused kernel; the operations
  // path uses grad_divisor_tensor when it is defined, so that it never reads the norm on the host).
  double grad_divisor = 1;
  torch::Tensor grad_divisor_tensor;
};

// |w|, the trust-ratio denominator, r and |g| of one adapted tensor (telemetry's numbers).
struct LayerNorms {
  double weight = 0, update = 0, ratio = 1, grad = 0;
};

// Why the fused kernel cannot take this tensor, or "" when it can.
std::string why_not_fusable(const StepEntry& entry);

// The sum of |g|^2 over the entries' gradients (all fusable), in a fixed order of fixed chunks: the same for any
// thread count and instruction set.
double fused_gradient_squares(const std::vector<StepEntry>& entries);

// Steps every entry; norms (resized to entries.size()) gets the numbers of adapted entries when given.
void fused_step(const std::vector<StepEntry>& entries, std::vector<LayerNorms>* norms);

// Steps one tensor; returns stack(|w|, denominator, r, |g|) as double for an adapted tensor when record is
// set, an undefined tensor otherwise.
torch::Tensor tensor_ops_step(const StepEntry& entry, bool record);

// ---- the trust ratio, for host doubles and for device tensors alike

inline double clamp_to(double x, double lo, double hi) { return x < lo ? lo : (x > hi ? hi : x); }
inline torch::Tensor clamp_to(const torch::Tensor& x, double lo, double hi) { return x.clamp(lo, hi); }
inline double at_most(double x, double hi) { return x > hi ? hi : x; }
inline torch::Tensor at_most(const torch::Tensor& x, double hi) { return x.clamp_max(hi); }
inline bool both_positive(double a, double b) { return a > 0 && b > 0; }
inline torch::Tensor both_positive(const torch::Tensor& a, const torch::Tensor& b) {
  return a.gt(0).logical_and(b.gt(0));
}
inline double choose(bool condition, double a, double b) { return condition ? a : b; }
inline torch::Tensor choose(const torch::Tensor& condition, const torch::Tensor& a, double b) {
  return torch::where(condition, a, torch::full_like(a, b));
}
inline double one_like(double) { return 1.0; }
inline torch::Tensor one_like(const torch::Tensor& x) { return torch::ones_like(x); }

// The LARC clip min(r / lr, 1); at lr = 0 its limit, 1 (a positive r over a vanishing lr).
template <typename T>
T larc_clipped(const T& ratio, double lr) {
  return lr > 0 ? at_most(ratio / lr, 1.0) : one_like(ratio);
}

// Whether a tensor has a trust ratio: |w| and the guard's norm (the denominator, or |g|) both positive.
template <typename T>
auto guard_passes(const T& w_norm, const T& denominator, const T& g_norm, const LayerwiseOptions& o) {
  return both_positive(w_norm, o.zero_guard() == ZeroGuard::kGradient ? g_norm : denominator);
}

// Denominator of the ratio from |u| (the direction before decay), |d| = |u + wd w| and |w|; decay: the tensor's
// direction holds wd w (coupled decay).
template <typename T>
T trust_denominator(const T& u_norm, const T& d_norm, const T& w_norm, bool decay, const LayerwiseOptions& o) {
  if (o.trust_denominator() == TrustDenominator::kExact) return d_norm;
  T sum = u_norm;
  if (decay) sum = sum + o.weight_decay() * w_norm;
  if (o.trust_eps() != 0) sum = sum + o.trust_eps();
  return sum;
}

// r = eta phi_t clamp(|w|) / clamp(denominator), LARC clip and ratio clamp when set; where the guard does not pass,
// r = 1 (then the LARC clip for kClippedUnitRatio): no NaN, no zero-initialised tensor stuck at zero.
template <typename T>
T trust_ratio(const T& w_norm, const T& denominator, const T& g_norm, const LayerwiseOptions& o, double phi,
              double lr) {
  const T w = o.weight_norm_clamp() ? clamp_to(w_norm, o.weight_norm_clamp()->lo, o.weight_norm_clamp()->hi) : w_norm;
  const T d = o.update_norm_clamp() ? clamp_to(denominator, o.update_norm_clamp()->lo, o.update_norm_clamp()->hi)
                                    : denominator;
  T ratio = w * (o.eta() * phi) / d;
  if (o.larc_clip()) ratio = larc_clipped(ratio, lr);
  if (o.trust_ratio_clamp()) ratio = clamp_to(ratio, o.trust_ratio_clamp()->lo, o.trust_ratio_clamp()->hi);
  const double guarded =
      o.larc_clip() && o.guarded_update() == GuardedUpdate::kClippedUnitRatio ? larc_clipped(1.0, lr) : 1.0;
  return choose(guard_passes(w_norm, denominator, g_norm, o), ratio, guarded);
}

}  // namespace detail
}  // namespace optim
}  // namespace largebatch
