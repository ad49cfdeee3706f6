#pragma once
// The layer-wise engine: one optimizer whose stages are
//   direction (gradient, or Adam moments) -> weight decay (decay mask) -> trust ratio with phi_t
//   (adaptation mask) -> heavy-ball momentum (optional) -> learning rate.
// LARS, TVLARS and LAMB are presets of it (see factory.h), exactly as specified in docs/algorithms.md.
// The step never reads a tensor value on the host, so it runs on CUDA without synchronisation; on the CPU a
// fused kernel computes all norms in one pass and updates each element once (see set_kernel).
#include <largebatch/optim/mask.h>
#include <largebatch/optim/schedule.h>
#include <largebatch/optim/telemetry.h>

#include <torch/optim/optimizer.h>
#include <torch/optim/serialize.h>
#include <torch/ordered_dict.h>
#include <torch/serialize/archive.h>
#include <torch/types.h>

#include <c10/util/Optional.h>

#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

namespace largebatch {
namespace optim {

using NamedParameters = torch::OrderedDict<std::string, torch::Tensor>;

// How the update direction is formed before weight decay and the trust ratio.
enum class Direction : int64_t {
  kMomentum = 0,  // LARS: d = g (+ wd w), then heavy-ball momentum on the scaled d
  kAdam = 1,      // LAMB: s = m^ / (sqrt(v^) + eps) (+ wd w), no momentum stage after the ratio
};

// Denominator of the trust ratio.
enum class TrustDenominator : int64_t {
  kExact = 0,  // |g + wd w| (|s| for LAMB): docs/algorithms.md
  kSum = 1,    // |g| + wd |w| + trust_eps (the LARS paper, apex, MLPerf)
};

// Which norms decide that a tensor has no trust ratio (the zero-norm guard): a zero |w|, or a zero ...
enum class ZeroGuard : int64_t {
  kDenominator = 0,  // ... trust-ratio denominator (|g + wd w|, |s + wd w| or the sum form): this project, Barlow Twins, timm's Lamb
  kGradient = 1,     // ... gradient |g| (the raw gradient, not g + wd w): timm's Lars, apex's LARC
};

// What a guarded tensor (zero |w| or zero guard norm) steps with.
enum class GuardedUpdate : int64_t {
  kUnitRatio = 0,         // r = 1 (the LARC clip does not apply)
  kClippedUnitRatio = 1,  // r = 1, then the LARC clip when on: min(1 / lr, 1) (timm's Lars)
  kRawGradient = 2,       // r = 1 and no coupled decay: d = g (apex's LARC)
};

// Text forms ("denominator", "gradient"; "unit-ratio", "clipped-unit-ratio", "raw-gradient") and their inverses
// (std::invalid_argument naming the choices).
std::string to_string(ZeroGuard guard);
std::string to_string(GuardedUpdate update);
ZeroGuard parse_zero_guard(const std::string& text);
GuardedUpdate parse_guarded_update(const std::string& text);

// Which code applies a step.
enum class StepKernel : int64_t {
  // The fused CPU kernel for dense contiguous float/double CPU tensors (norms, then the update while the
  // tensors are cached; no per-tensor dispatch), per-tensor LibTorch operations for the rest (CUDA, other
  // types, strided gradients).
  kAuto = 0,
  kFused = 1,      // the fused kernel for every tensor; a tensor it cannot take is an error naming it
  kTensorOps = 2,  // per-tensor LibTorch operations for every tensor (the device-agnostic reference)
};

// The fused kernel's loops are compiled for several x86 instruction sets and the widest the CPU runs is used
// (environment variable LARGEBATCH_STEP_SIMD picks another). Every variant gives bit-identical results.
// The variants this build has and this CPU runs, narrowest first ("baseline", then "avx2", "avx512").
std::vector<std::string> fused_step_instruction_sets();
// The one in use.
std::string fused_step_instruction_set();
// Use this one from now on (std::invalid_argument naming the choices when unknown or not runnable here).
void use_fused_step_instruction_set(const std::string& name);

// The caches of the CPU this process runs on, as Linux describes cpu0's (/sys/devices/system/cpu/cpu0/cache;
// sysconf where that is missing): sizes in bytes, 0 where unknown, and how many logical CPUs share one.
struct CpuCaches {
  int64_t l1d_bytes = 0, l2_bytes = 0, l3_bytes = 0;
  int l2_shared_by = 1, l3_shared_by = 1;
  std::string source;  // "sysfs", "sysconf" or "none"
};
CpuCaches cpu_caches();

// The fused kernel steps blocks of whole tensors whose w, g and state take about this many bytes per thread,
// so that a block is still cached when its second pass follows its first: half the L2 cache one logical CPU
// has (512 KiB when the caches are unknown), or the environment variable LARGEBATCH_STEP_BLOCK_BYTES (bytes,
// or with a K or M suffix). The blocking never changes the results.
int64_t fused_step_block_bytes();
// Use this budget per thread from now on; 0: the default again (LARGEBATCH_STEP_BLOCK_BYTES, else the caches'),
// read at the next step (std::invalid_argument below 0).
void use_fused_step_block_bytes(int64_t bytes);
// Parses a byte count: "524288", "512K", "1M" (std::invalid_argument naming `what` otherwise).
int64_t parse_byte_count(const std::string& text, const std::string& what);

struct Range {
  double lo = 0;
  double hi = 0;
  bool operator==(const Range& o) const { return lo == o.lo && hi == o.hi; }
};

struct LayerwiseOptions : public torch::optim::OptimizerCloneableOptions<LayerwiseOptions> {
  explicit LayerwiseOptions(double lr = 0.1) : lr_(lr) {}

  // Presets' building blocks (factory.h has the named presets).
  static LayerwiseOptions lars(double lr);   // heavy-ball LARS, docs/algorithms.md defaults
  static LayerwiseOptions lamb(double lr);   // LAMB (You et al.), bias correction on

  TORCH_ARG(double, lr);
  TORCH_ARG(Direction, direction) = Direction::kMomentum;
  // kMomentum
  TORCH_ARG(double, momentum) = 0.9;
  TORCH_ARG(bool, nesterov) = false;
  // kAdam
  TORCH_ARG(double, beta1) = 0.9;
  TORCH_ARG(double, beta2) = 0.999;
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(bool, bias_correction) = true;
  // decay
  TORCH_ARG(double, weight_decay) = 5e-4;
  // trust ratio r = eta * phi_t * clamp(|w|) / clamp(denominator)
  TORCH_ARG(double, eta) = 1e-3;
  TORCH_ARG(TrustDenominator, trust_denominator) = TrustDenominator::kExact;
  TORCH_ARG(double, trust_eps) = 0.0;
  TORCH_ARG(c10::optional<Range>, weight_norm_clamp) = c10::nullopt;
  TORCH_ARG(c10::optional<Range>, update_norm_clamp) = c10::nullopt;
  // LARC clipping: r <- min(r / lr_t, 1)
  TORCH_ARG(bool, larc_clip) = false;
  TORCH_ARG(c10::optional<Range>, trust_ratio_clamp) = c10::nullopt;
  TORCH_ARG(ZeroGuard, zero_guard) = ZeroGuard::kDenominator;
  TORCH_ARG(GuardedUpdate, guarded_update) = GuardedUpdate::kUnitRatio;
  // TVLARS factor phi_t on the ratio of adapted tensors; nullopt means phi_t = 1.
  TORCH_ARG(c10::optional<TimeVarying>, time_varying) = c10::nullopt;
  // Global pre-normalisation (timm's Lamb, NVIDIA FusedLAMB): before anything else every gradient is divided by
  // max(1, sqrt(sum of |g|^2 over every tensor of the optimizer) / max_grad_norm). The norm spans all groups;
  // each group divides by its own threshold's factor.
  TORCH_ARG(c10::optional<double>, max_grad_norm) = c10::nullopt;
  // Decoupled decay: w <- w (1 - lr wd) first (the ratio then sees the decayed w), instead of wd w in the direction.
  TORCH_ARG(bool, decoupled_decay) = false;
  // masks
  TORCH_ARG(ParamMask, decay_mask) = ParamMask::exclude_1d();
  TORCH_ARG(ParamMask, adapt_mask) = ParamMask::exclude_1d();
  // false: a group with weight_decay 0 adapts no tensor, whatever adapt_mask says (timm's always_adapt = False).
  TORCH_ARG(bool, always_adapt) = true;
  // The learning rate of the tensors that are not adapted, as a fraction of lr (the Barlow Twins recipe's bias and
  // norm group): the schedule sets lr alone and the optimizer applies the ratio.
  TORCH_ARG(double, lr_ratio_1d) = 1.0;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
  double get_lr() const override { return lr(); }
  void set_lr(const double lr) override { this->lr(lr); }

  // Throws std::invalid_argument naming the first bad option and its value.
  void validate() const;
  // One line, every option: for logs and config files.
  std::string describe() const;
};

struct LayerwiseParamState
    : public torch::optim::OptimizerCloneableParamState<LayerwiseParamState> {
  TORCH_ARG(int64_t, step) = 0;            // t: updates applied to this tensor so far
  TORCH_ARG(torch::Tensor, momentum_buffer);
  TORCH_ARG(torch::Tensor, exp_avg);
  TORCH_ARG(torch::Tensor, exp_avg_sq);
  // Masks resolved for this tensor when the optimizer was built; saved with the state.
  TORCH_ARG(std::string, name);
  TORCH_ARG(bool, decay) = false;
  TORCH_ARG(bool, adapt) = false;

 public:
  void serialize(torch::serialize::InputArchive& archive) override;
  void serialize(torch::serialize::OutputArchive& archive) const override;
};

class LayerwiseOptimizer : public torch::optim::Optimizer {
 public:
  LayerwiseOptimizer(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                     LayerwiseOptions defaults);
  LayerwiseOptimizer(std::vector<torch::Tensor> params, LayerwiseOptions defaults);
  // Names (e.g. module->named_parameters()) let masks match on them and label telemetry.
  LayerwiseOptimizer(const NamedParameters& named_params, LayerwiseOptions defaults);
  // Named parameter groups: each group has its own options.
  LayerwiseOptimizer(const std::vector<std::pair<NamedParameters, LayerwiseOptions>>& groups,
                     LayerwiseOptions defaults);

  torch::Tensor step(LossClosure closure = nullptr) override;
  void save(torch::serialize::OutputArchive& archive) const override;
  void load(torch::serialize::InputArchive& archive) override;

  // Resolved masks of a parameter of this optimizer (std::out_of_range for a foreign tensor); adapts() also
  // applies always_adapt with its group's current weight decay.
  bool decays(const torch::Tensor& param) const;
  bool adapts(const torch::Tensor& param) const;
  const std::string& name_of(const torch::Tensor& param) const;
  // Steps taken so far (the largest per-tensor step counter).
  int64_t steps_taken() const;
  // Bytes one steady-state step must move through memory at the least: every element of w, g and the state
  // read once, w and the state written once (the norms need no traffic of their own when the update follows
  // them while the tensor is cached, as the fused kernel does). Benchmarks divide it by a measured bandwidth to
  // get the bound.
  int64_t step_memory_traffic() const;

  // Which code applies the step (results agree to float rounding; the golden tests run both).
  void set_kernel(StepKernel kernel) { kernel_ = kernel; }
  StepKernel kernel() const { return kernel_; }

  // Telemetry is off by default; when off, step() does no extra work.
  void set_telemetry(bool enabled) { telemetry_enabled_ = enabled; }
  bool telemetry_enabled() const { return telemetry_enabled_; }
  // Called after every step while telemetry is on.
  void set_telemetry_callback(TelemetryCallback callback) { telemetry_callback_ = std::move(callback); }
  // The record of the last step taken with telemetry on.
  const StepTelemetry& last_telemetry() const { return last_telemetry_; }

 private:
  void init_states(const std::unordered_map<const void*, std::string>& names);
  LayerwiseParamState& state_of(const torch::Tensor& param) const;

  StepKernel kernel_ = StepKernel::kAuto;
  bool telemetry_enabled_ = false;
  TelemetryCallback telemetry_callback_;
  StepTelemetry last_telemetry_;
};

// Named thin faces of the engine, for users who expect LibTorch-style class names.
class LARS : public LayerwiseOptimizer {
 public:
  LARS(const NamedParameters& params, LayerwiseOptions options);
  LARS(std::vector<torch::Tensor> params, LayerwiseOptions options);
};
// TVLARS: LARS whose options carry time_varying (phi with alpha 1, lambda 1e-3, delay 0, gamma_min 0 when none is
// given; the tvlars:paper preset also sets gamma_min = 0.001 B / 256).
class TVLARS : public LayerwiseOptimizer {
 public:
  TVLARS(const NamedParameters& params, LayerwiseOptions options);
  TVLARS(std::vector<torch::Tensor> params, LayerwiseOptions options);
};
class LAMB : public LayerwiseOptimizer {
 public:
  LAMB(const NamedParameters& params, LayerwiseOptions options);
  LAMB(std::vector<torch::Tensor> params, LayerwiseOptions options);
};

}  // namespace optim
}  // namespace largebatch
