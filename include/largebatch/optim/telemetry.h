#pragma once
// Per-step, per-layer records for the paper's layer-wise analysis (LNR = trust ratio).
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

namespace largebatch {
namespace optim {

struct LayerTelemetry {
  std::string name;      // parameter name ("param.<i>" when the optimizer was given no names)
  double weight_norm;    // |w| before the step (unclamped)
  double update_norm;    // the ratio's denominator, unclamped: |d| (LARS), |s| (LAMB); |u| + wd |w| + trust_eps with trust_denominator=sum
  double trust_ratio;    // r, including phi_t
  double effective_lr;   // lr_t * r
  double grad_norm = 0;  // |g|, the raw gradient
};

struct StepTelemetry {
  int64_t step = 0;  // 0-based optimizer step t
  double lr = 0;     // lr_t of the first parameter group
  double phi = 1;    // phi_t (1 without the time-varying factor)
  std::vector<LayerTelemetry> layers;  // adapted tensors only, in parameter order
};

using TelemetryCallback = std::function<void(const StepTelemetry&)>;

}  // namespace optim
}  // namespace largebatch
