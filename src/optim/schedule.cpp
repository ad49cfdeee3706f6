#include <largebatch/optim/schedule.h>

#include <torch/optim/optimizer.h>

#include <cmath>
#include <sstream>
#include <stdexcept>

namespace largebatch {
namespace optim {

namespace {
[[noreturn]] void bad(const std::string& option, double value, const std::string& rule) {
  std::ostringstream os;
  os << "invalid option " << option << " = " << value << ": " << rule;
  throw std::invalid_argument(os.str());
}
}  // namespace

double tv_phi(const TimeVarying& tv, int64_t t) {
  const double psi = tv.lambda * (static_cast<double>(t) - tv.delay);
  // exp overflows to +inf for psi > ~709, and 1 / inf = 0: phi -> gamma_min, as the formula says.
  return 1.0 / (tv.alpha + std::exp(psi)) + tv.gamma_min;
}

void validate(const TimeVarying& tv) {
  if (!(tv.alpha > 0) || std::isinf(tv.alpha)) bad("alpha", tv.alpha, "must be finite and > 0");
  if (!(tv.lambda >= 0) || std::isinf(tv.lambda)) bad("lambda", tv.lambda, "must be finite and >= 0");
  if (!(tv.gamma_min >= 0) || std::isinf(tv.gamma_min)) bad("gamma_min", tv.gamma_min, "must be finite and >= 0");
  if (!std::isfinite(tv.delay)) bad("delay", tv.delay, "must be finite");
}

ScheduleKind parse_schedule_kind(const std::string& name) {
  if (name == "constant") return ScheduleKind::kConstant;
  if (name == "cosine") return ScheduleKind::kCosine;
  if (name == "warmup-cosine" || name == "warmup_cosine") return ScheduleKind::kWarmupCosine;
  if (name == "poly") return ScheduleKind::kPoly;
  if (name == "step") return ScheduleKind::kStep;
  throw std::invalid_argument("unknown schedule '" + name + "' (expected constant, cosine, warmup-cosine, poly or step)");
}

bool has_warmup(ScheduleKind kind) {
  return kind == ScheduleKind::kWarmupCosine || kind == ScheduleKind::kPoly || kind == ScheduleKind::kStep;
}

LrScaling parse_lr_scaling(const std::string& name) {
  if (name == "none") return LrScaling::kNone;
  if (name == "linear") return LrScaling::kLinear;
  if (name == "sqrt") return LrScaling::kSqrt;
  throw std::invalid_argument("unknown lr scaling '" + name + "' (expected none, linear or sqrt)");
}

std::string to_string(ScheduleKind kind) {
  switch (kind) {
    case ScheduleKind::kConstant: return "constant";
    case ScheduleKind::kCosine: return "cosine";
    case ScheduleKind::kWarmupCosine: return "warmup-cosine";
    case ScheduleKind::kPoly: return "poly";
    case ScheduleKind::kStep: return "step";
  }
  return "?";
}

std::string to_string(LrScaling scaling) {
  switch (scaling) {
    case LrScaling::kNone: return "none";
    case LrScaling::kLinear: return "linear";
    case LrScaling::kSqrt: return "sqrt";
  }
  return "?";
}

LrSchedule::LrSchedule(ScheduleOptions o) : options_(o) {
  if (!(o.lr >= 0) || std::isinf(o.lr)) bad("lr", o.lr, "must be finite and >= 0");
  if (o.batch_size <= 0) bad("batch_size", static_cast<double>(o.batch_size), "must be > 0");
  if (o.base_batch_size <= 0) bad("base_batch_size", static_cast<double>(o.base_batch_size), "must be > 0");
  if (o.total_steps <= 0) bad("total_steps", static_cast<double>(o.total_steps), "must be > 0");
  if (o.warmup_steps < 0) bad("warmup_steps", static_cast<double>(o.warmup_steps), "must be >= 0");
  if (has_warmup(o.kind) && o.warmup_steps > o.total_steps)
    bad("warmup_steps", static_cast<double>(o.warmup_steps), "must be <= total_steps");
  if (!(o.final_ratio >= 0 && o.final_ratio <= 1)) bad("final_ratio", o.final_ratio, "must be in [0, 1]");
  if (!(o.poly_power > 0) || std::isinf(o.poly_power)) bad("poly_power", o.poly_power, "must be finite and > 0");
  if (!(o.step_gamma > 0 && o.step_gamma <= 1)) bad("step_gamma", o.step_gamma, "must be in (0, 1]");
  for (size_t i = 0; i < o.milestones.size(); ++i)
    if (o.milestones[i] < 0 || (i > 0 && o.milestones[i] <= o.milestones[i - 1]))
      bad("milestones", static_cast<double>(o.milestones[i]), "must be >= 0 and increasing");
  const double ratio = static_cast<double>(o.batch_size) / static_cast<double>(o.base_batch_size);
  switch (o.scaling) {
    case LrScaling::kNone: peak_ = o.lr; break;
    case LrScaling::kLinear: peak_ = o.lr * ratio; break;
    case LrScaling::kSqrt: peak_ = o.lr * std::sqrt(ratio); break;
  }
}

double LrSchedule::at(int64_t step) const {
  const auto& o = options_;
  if (o.kind == ScheduleKind::kConstant) return peak_;
  const int64_t warmup = has_warmup(o.kind) ? o.warmup_steps : 0;
  if (step < warmup) return peak_ * static_cast<double>(step) / static_cast<double>(warmup);
  if (o.kind == ScheduleKind::kStep) {
    double lr = peak_;
    for (int64_t m : o.milestones)
      if (step >= m) lr *= o.step_gamma;
    return lr;
  }
  const int64_t span = o.total_steps - warmup;
  if (span <= 0) return peak_;  // warm-up spans the whole run: stay at the peak after it
  const double progress = std::min<double>(1.0, static_cast<double>(step - warmup) / static_cast<double>(span));
  if (o.kind == ScheduleKind::kPoly) {
    const double end = o.final_ratio * peak_;
    return end + (peak_ - end) * std::pow(1.0 - progress, o.poly_power);
  }
  const double q = (1.0 + std::cos(M_PI * progress)) / 2.0;
  return peak_ * q + o.final_ratio * peak_ * (1.0 - q);
}

void set_learning_rate(torch::optim::Optimizer& optimizer, double lr) {
  for (auto& group : optimizer.param_groups()) group.options().set_lr(lr);
}

}  // namespace optim
}  // namespace largebatch
