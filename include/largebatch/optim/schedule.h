#pragma once
// Learning-rate schedules and the TVLARS factor phi_t. Schedules live outside the optimizers: the
// training loop asks the schedule for lr_t and writes it into the optimizer's parameter groups.
#include <cstdint>
#include <string>
#include <vector>

namespace torch {
namespace optim {
class Optimizer;
}
}  // namespace torch

namespace largebatch {
namespace optim {

// phi_t = 1 / (alpha + exp(lambda * (t - delay))) + gamma_min   (docs/algorithms.md, TVLARS)
struct TimeVarying {
  double alpha = 1.0;
  double lambda = 1e-3;
  double delay = 0.0;      // d_e, in optimizer steps
  double gamma_min = 0.0;
  bool operator==(const TimeVarying& o) const {
    return alpha == o.alpha && lambda == o.lambda && delay == o.delay && gamma_min == o.gamma_min;
  }
};

// phi_t for 0-based step t. Overflow-safe: exp() of a large exponent gives phi = gamma_min.
double tv_phi(const TimeVarying& tv, int64_t t);

// Throws std::invalid_argument naming the option when alpha <= 0, lambda < 0 or gamma_min < 0.
void validate(const TimeVarying& tv);

enum class ScheduleKind { kConstant, kCosine, kWarmupCosine, kPoly, kStep };
enum class LrScaling { kNone, kLinear, kSqrt };

ScheduleKind parse_schedule_kind(const std::string& name);  // constant | cosine | warmup-cosine | poly | step
// Whether a kind starts with the linear warm-up (warmup-cosine, poly, step).
bool has_warmup(ScheduleKind kind);
LrScaling parse_lr_scaling(const std::string& name);        // none | linear | sqrt
std::string to_string(ScheduleKind kind);
std::string to_string(LrScaling scaling);

struct ScheduleOptions {
  ScheduleKind kind = ScheduleKind::kConstant;
  double lr = 0.1;                // the base learning rate ("--lr")
  LrScaling scaling = LrScaling::kNone;
  int64_t batch_size = 256;       // B
  int64_t base_batch_size = 256;  // B_base
  int64_t warmup_steps = 0;       // W
  int64_t total_steps = 1;        // T
  double final_ratio = 0.001;     // lr at T as a fraction of the peak (cosine, poly)
  double poly_power = 2.0;        // kPoly's exponent (MLPerf's LARS schedule: 2)
  std::vector<int64_t> milestones;  // kStep: the steps at which lr is multiplied by step_gamma, increasing
  double step_gamma = 0.1;
};

// peak = lr * scale(B / B_base)
//   step < W: lr_t = peak * step / W
//   else:     q = (1 + cos(pi (step - W) / (T - W))) / 2 ; lr_t = peak q + final_ratio peak (1 - q)
// kCosine is kWarmupCosine with W = 0; kConstant returns the peak at every step.
// kPoly, after the same warm-up: end = final_ratio peak, lr_t = end + (peak - end) (1 - (step - W) / (T - W))^power.
// kStep, after the same warm-up: lr_t = peak step_gamma^k, k the milestones <= step.
class LrSchedule {
 public:
  explicit LrSchedule(ScheduleOptions options);  // validates; std::invalid_argument on bad values
  double peak() const { return peak_; }
  double at(int64_t step) const;
  const ScheduleOptions& options() const { return options_; }

 private:
  ScheduleOptions options_;
  double peak_;
};

// Writes lr into every parameter group of any torch::optim::Optimizer.
void set_learning_rate(torch::optim::Optimizer& optimizer, double lr);

}  // namespace optim
}  // namespace largebatch
