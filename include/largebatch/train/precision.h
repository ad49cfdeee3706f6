#pragma once
// Mixed precision: --precision bf16 runs the forward pass under LibTorch's autocast to bfloat16 (CPU autocast on
// the CPU, CUDA autocast on a GPU). Parameters, gradients, optimizer state, norms and trust ratios stay float32:
// autocast casts a float32 weight to bfloat16 inside each matrix product and convolution, and its gradient flows
// back into the float32 parameter, so micro-batches accumulate in float32. No loss scaling: bfloat16 keeps
// float32's 8-bit exponent, so gradients do not underflow as float16's (5-bit exponent) do.
#include <ATen/autocast_mode.h>
#include <c10/core/Device.h>

#include <stdexcept>
#include <string>

namespace largebatch {
namespace train {

// "fp32" or "bf16"; std::invalid_argument otherwise.
inline bool is_bf16(const std::string& precision) {
  if (precision == "bf16") return true;
  if (precision == "fp32") return false;
  throw std::invalid_argument("precision '" + precision + "' is not fp32 or bf16");
}

// bf16 autocast on a device for the guard's scope (nothing when off); the previous state comes back after it.
class AutocastGuard {
 public:
  AutocastGuard(bool on, const c10::Device& device) : on_(on), cuda_(device.is_cuda()) {
    if (!on_) return;
    if (cuda_) {
      was_enabled_ = at::autocast::is_enabled();
      was_dtype_ = at::autocast::get_autocast_gpu_dtype();
      at::autocast::set_autocast_gpu_dtype(at::kBFloat16);
      at::autocast::set_enabled(true);
    } else {
      was_enabled_ = at::autocast::is_cpu_enabled();
      was_dtype_ = at::autocast::get_autocast_cpu_dtype();
      at::autocast::set_autocast_cpu_dtype(at::kBFloat16);
      at::autocast::set_cpu_enabled(true);
    }
    at::autocast::increment_nesting();
  }
  ~AutocastGuard() {
    if (!on_) return;
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();  // the cast weights of this pass
    if (cuda_) {
      at::autocast::set_enabled(was_enabled_);
      at::autocast::set_autocast_gpu_dtype(was_dtype_);
    } else {
      at::autocast::set_cpu_enabled(was_enabled_);
      at::autocast::set_autocast_cpu_dtype(was_dtype_);
    }
  }
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  bool on_, cuda_;
  bool was_enabled_ = false;
  at::ScalarType was_dtype_ = at::kBFloat16;
};

}  // namespace train
}  // namespace largebatch
