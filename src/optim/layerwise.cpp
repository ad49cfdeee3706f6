#include <largebatch/optim/layerwise.h>

#include "step_kernels.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <regex>
#include <sstream>
#include <stdexcept>
#include <unordered_set>

namespace largebatch {
namespace optim {

// ---------------------------------------------------------------- masks

bool ParamMask::applies(const std::string& name, int64_t ndim) const {
  if (ndim <= exclude_max_ndim) return false;
  for (const auto& pattern : exclude_names) {
    if (std::regex_search(name, std::regex(pattern))) return false;
  }
  return true;
}

std::string ParamMask::to_string() const {
  std::string out;
  if (exclude_max_ndim == INT64_MAX) return "none";
  if (exclude_max_ndim < 0 && exclude_names.empty()) return "all";
  if (exclude_max_ndim >= 0) out = "ndim<=" + std::to_string(exclude_max_ndim);
  for (const auto& n : exclude_names) out += (out.empty() ? "" : ";") + std::string("name~") + n;
  return out;
}

ParamMask ParamMask::parse(const std::string& text, const std::string& what) {
  if (text == "none") return ParamMask::none();
  if (text == "all") return ParamMask::all();
  ParamMask mask{-1, {}};
  std::stringstream ss(text);
  std::string item;
  bool any = false;
  while (std::getline(ss, item, ';')) {
    if (item.empty()) continue;
    any = true;
    if (item.rfind("ndim<=", 0) == 0) {
      const std::string num = item.substr(6);
      size_t used = 0;
      long long v = -1;
      try {
        v = std::stoll(num, &used);
      } catch (const std::exception&) {
        used = 0;
      }
      if (used != num.size() || num.empty() || v < 0)
        throw std::invalid_argument(what + ": bad ndim bound in '" + text + "'");
      mask.exclude_max_ndim = v;
    } else if (item.rfind("name~", 0) == 0 && item.size() > 5) {
      const std::string pattern = item.substr(5);
      try {
        std::regex check(pattern);
      } catch (const std::regex_error&) {
        throw std::invalid_argument(what + ": bad regular expression '" + pattern + "'");
      }
      mask.exclude_names.push_back(pattern);
    } else {
      throw std::invalid_argument(what + ": cannot parse '" + item + "' in '" + text +
                                  "' (expected all | none | ndim<=N;name~REGEX;...)");
    }
  }
  if (!any) throw std::invalid_argument(what + ": empty mask");
  return mask;
}

// ---------------------------------------------------------------- options

std::string to_string(ZeroGuard guard) { return guard == ZeroGuard::kGradient ? "gradient" : "denominator"; }

std::string to_string(GuardedUpdate update) {
  switch (update) {
    case GuardedUpdate::kClippedUnitRatio: return "clipped-unit-ratio";
    case GuardedUpdate::kRawGradient: return "raw-gradient";
    default: return "unit-ratio";
  }
}

ZeroGuard parse_zero_guard(const std::string& text) {
  if (text == "denominator") return ZeroGuard::kDenominator;
  if (text == "gradient") return ZeroGuard::kGradient;
  throw std::invalid_argument("optimizer option zero_guard: '" + text + "' is not denominator or gradient");
}

GuardedUpdate parse_guarded_update(const std::string& text) {
  for (GuardedUpdate u : {GuardedUpdate::kUnitRatio, GuardedUpdate::kClippedUnitRatio, GuardedUpdate::kRawGradient})
    if (text == to_string(u)) return u;
  throw std::invalid_argument("optimizer option guarded_update: '" + text +
                              "' is not unit-ratio, clipped-unit-ratio or raw-gradient");
}

LayerwiseOptions LayerwiseOptions::lars(double lr) {
  return LayerwiseOptions(lr).direction(Direction::kMomentum).momentum(0.9).weight_decay(5e-4).eta(1e-3);
}

LayerwiseOptions LayerwiseOptions::lamb(double lr) {
  return LayerwiseOptions(lr)
      .direction(Direction::kAdam)
      .beta1(0.9)
      .beta2(0.999)
      .eps(1e-6)
      .bias_correction(true)
      .weight_decay(0.01)
      .eta(1.0);
}

namespace {

[[noreturn]] void bad_option(const std::string& option, double value, const std::string& rule) {
  std::ostringstream os;
  os << "invalid optimizer option " << option << " = " << value << ": " << rule;
  throw std::invalid_argument(os.str());
}

void check_range(const c10::optional<Range>& r, const std::string& name, bool positive_hi = false) {
  if (!r) return;
  if (!(r->lo >= 0)) bad_option(name + ".lo", r->lo, "must be >= 0");
  if (!(r->hi >= r->lo)) bad_option(name + ".hi", r->hi, "must be >= lo");
  // A norm clamped to [0, 0] is 0 while the true norm is not: the ratio would be 0, inf or NaN.
  if (positive_hi && !(r->hi > 0)) bad_option(name + ".hi", r->hi, "must be > 0");
}

void write_range(torch::serialize::OutputArchive& a, const std::string& key, const c10::optional<Range>& r) {
  a.write(key + "/set", c10::IValue(r.has_value()));
  a.write(key + "/lo", c10::IValue(r ? r->lo : 0.0));
  a.write(key + "/hi", c10::IValue(r ? r->hi : 0.0));
}

c10::optional<Range> read_range(torch::serialize::InputArchive& a, const std::string& key) {
  c10::IValue set, lo, hi;
  if (!a.try_read(key + "/set", set) || !set.toBool()) return c10::nullopt;
  a.read(key + "/lo", lo);
  a.read(key + "/hi", hi);
  return Range{lo.toDouble(), hi.toDouble()};
}

template <typename T>
T read_value(torch::serialize::InputArchive& a, const std::string& key, T fallback) {
  c10::IValue v;
  if (!a.try_read(key, v)) return fallback;
  return v.to<T>();
}

// An enum saved as its integer; a value outside [first, last] is a damaged checkpoint.
template <typename E>
E read_enum(torch::serialize::InputArchive& a, const std::string& key, E first, E last) {
  const int64_t v = read_value<int64_t>(a, key, static_cast<int64_t>(first));
  if (v < static_cast<int64_t>(first) || v > static_cast<int64_t>(last))
    throw std::invalid_argument("checkpoint optimizer option " + key + " = " + std::to_string(v) + " is not known");
  return static_cast<E>(v);
}

std::string range_text(const c10::optional<Range>& r) {
  if (!r) return "none";
  std::ostringstream os;
  os << r->lo << ":" << r->hi;
  return os.str();
}

}  // namespace

void LayerwiseOptions::validate() const {
  if (!(lr() >= 0) || std::isinf(lr())) bad_option("lr", lr(), "must be finite and >= 0");
  if (!(momentum() >= 0 && momentum() < 1)) bad_option("momentum", momentum(), "must be in [0, 1)");
  if (nesterov() && direction() == Direction::kMomentum && momentum() == 0)
    bad_option("momentum", momentum(), "nesterov needs momentum > 0");
  if (!(beta1() >= 0 && beta1() < 1)) bad_option("beta1", beta1(), "must be in [0, 1)");
  if (!(beta2() >= 0 && beta2() < 1)) bad_option("beta2", beta2(), "must be in [0, 1)");
  if (!(eps() >= 0)) bad_option("eps", eps(), "must be >= 0");
  if (!(weight_decay() >= 0) || std::isinf(weight_decay()))
    bad_option("weight_decay", weight_decay(), "must be finite and >= 0");
  if (!(eta() > 0) || std::isinf(eta())) bad_option("eta", eta(), "must be finite and > 0");
  if (!(trust_eps() >= 0)) bad_option("trust_eps", trust_eps(), "must be >= 0");
  check_range(weight_norm_clamp(), "weight_norm_clamp", true);
  check_range(update_norm_clamp(), "update_norm_clamp", true);
  check_range(trust_ratio_clamp(), "trust_ratio_clamp");
  if (time_varying()) optim::validate(*time_varying());
  if (max_grad_norm() && (!(*max_grad_norm() > 0) || std::isinf(*max_grad_norm())))
    bad_option("max_grad_norm", *max_grad_norm(), "must be finite and > 0");
  if (!(lr_ratio_1d() >= 0) || std::isinf(lr_ratio_1d())) bad_option("lr_ratio_1d", lr_ratio_1d(), "must be finite and >= 0");
}

std::string LayerwiseOptions::describe() const {
  std::ostringstream os;
  os << "lr=" << lr() << " direction=" << (direction() == Direction::kAdam ? "adam" : "momentum");
  if (direction() == Direction::kMomentum)
    os << " momentum=" << momentum() << " nesterov=" << (nesterov() ? "true" : "false");
  else
    os << " beta1=" << beta1() << " beta2=" << beta2() << " eps=" << eps()
       << " bias_correction=" << (bias_correction() ? "true" : "false");
  os << " weight_decay=" << weight_decay() << " eta=" << eta()
     << " trust_denominator=" << (trust_denominator() == TrustDenominator::kSum ? "sum" : "exact");
  if (trust_denominator() == TrustDenominator::kSum) os << " trust_eps=" << trust_eps();
  os << " weight_norm_clamp=" << range_text(weight_norm_clamp())
     << " update_norm_clamp=" << range_text(update_norm_clamp())
     << " trust_ratio_clamp=" << range_text(trust_ratio_clamp())
     << " larc_clip=" << (larc_clip() ? "true" : "false") << " zero_guard=" << to_string(zero_guard())
     << " guarded_update=" << to_string(guarded_update());
  if (time_varying())
    os << " tv=on alpha=" << time_varying()->alpha << " lambda=" << time_varying()->lambda
       << " delay=" << time_varying()->delay << " gamma_min=" << time_varying()->gamma_min;
  else
    os << " tv=off";
  os << " max_grad_norm=";
  if (max_grad_norm()) os << *max_grad_norm();
  else os << "none";
  os << " decoupled_decay=" << (decoupled_decay() ? "true" : "false") << " decay_mask=" << decay_mask().to_string()
     << " adapt_mask=" << adapt_mask().to_string() << " always_adapt=" << (always_adapt() ? "true" : "false")
     << " lr_ratio_1d=" << lr_ratio_1d();
  return os.str();
}

void LayerwiseOptions::serialize(torch::serialize::OutputArchive& a) const {
  a.write("lr", c10::IValue(lr()));
  a.write("direction", c10::IValue(static_cast<int64_t>(direction())));
  a.write("momentum", c10::IValue(momentum()));
  a.write("nesterov", c10::IValue(nesterov()));
  a.write("beta1", c10::IValue(beta1()));
  a.write("beta2", c10::IValue(beta2()));
  a.write("eps", c10::IValue(eps()));
  a.write("bias_correction", c10::IValue(bias_correction()));
  a.write("weight_decay", c10::IValue(weight_decay()));
  a.write("eta", c10::IValue(eta()));
  a.write("trust_denominator", c10::IValue(static_cast<int64_t>(trust_denominator())));
  a.write("trust_eps", c10::IValue(trust_eps()));
  write_range(a, "weight_norm_clamp", weight_norm_clamp());
  write_range(a, "update_norm_clamp", update_norm_clamp());
  write_range(a, "trust_ratio_clamp", trust_ratio_clamp());
  a.write("larc_clip", c10::IValue(larc_clip()));
  const bool tv = time_varying().has_value();
  a.write("tv/set", c10::IValue(tv));
  a.write("tv/alpha", c10::IValue(tv ? time_varying()->alpha : 0.0));
  a.write("tv/lambda", c10::IValue(tv ? time_varying()->lambda : 0.0));
  a.write("tv/delay", c10::IValue(tv ? time_varying()->delay : 0.0));
  a.write("tv/gamma_min", c10::IValue(tv ? time_varying()->gamma_min : 0.0));
  a.write("decay_mask", c10::IValue(decay_mask().to_string()));
  a.write("adapt_mask", c10::IValue(adapt_mask().to_string()));
  a.write("zero_guard", c10::IValue(static_cast<int64_t>(zero_guard())));
  a.write("guarded_update", c10::IValue(static_cast<int64_t>(guarded_update())));
  a.write("max_grad_norm/set", c10::IValue(max_grad_norm().has_value()));
  a.write("max_grad_norm/value", c10::IValue(max_grad_norm().value_or(0.0)));
  a.write("decoupled_decay", c10::IValue(decoupled_decay()));
  a.write("always_adapt", c10::IValue(always_adapt()));
  a.write("lr_ratio_1d", c10::IValue(lr_ratio_1d()));
}

void LayerwiseOptions::serialize(torch::serialize::InputArchive& a) {
  lr(read_value<double>(a, "lr", lr()));
  direction(read_enum<Direction>(a, "direction", Direction::kMomentum, Direction::kAdam));
  momentum(read_value<double>(a, "momentum", momentum()));
  nesterov(read_value<bool>(a, "nesterov", nesterov()));
  beta1(read_value<double>(a, "beta1", beta1()));
  beta2(read_value<double>(a, "beta2", beta2()));
  eps(read_value<double>(a, "eps", eps()));
  bias_correction(read_value<bool>(a, "bias_correction", bias_correction()));
  weight_decay(read_value<double>(a, "weight_decay", weight_decay()));
  eta(read_value<double>(a, "eta", eta()));
  trust_denominator(read_enum<TrustDenominator>(a, "trust_denominator", TrustDenominator::kExact, TrustDenominator::kSum));
  trust_eps(read_value<double>(a, "trust_eps", trust_eps()));
  weight_norm_clamp(read_range(a, "weight_norm_clamp"));
  update_norm_clamp(read_range(a, "update_norm_clamp"));
  trust_ratio_clamp(read_range(a, "trust_ratio_clamp"));
  larc_clip(read_value<bool>(a, "larc_clip", larc_clip()));
  if (read_value<bool>(a, "tv/set", false)) {
    TimeVarying tv;
    tv.alpha = read_value<double>(a, "tv/alpha", tv.alpha);
    tv.lambda = read_value<double>(a, "tv/lambda", tv.lambda);
    tv.delay = read_value<double>(a, "tv/delay", tv.delay);
    tv.gamma_min = read_value<double>(a, "tv/gamma_min", tv.gamma_min);
    time_varying(tv);
  } else {
    time_varying(c10::nullopt);
  }
  decay_mask(ParamMask::parse(read_value<std::string>(a, "decay_mask", "ndim<=1"), "checkpoint decay_mask"));
  adapt_mask(ParamMask::parse(read_value<std::string>(a, "adapt_mask", "ndim<=1"), "checkpoint adapt_mask"));
  // Checkpoints of earlier versions lack what follows: the defaults are what those versions did.
  zero_guard(read_enum<ZeroGuard>(a, "zero_guard", ZeroGuard::kDenominator, ZeroGuard::kGradient));
  guarded_update(read_enum<GuardedUpdate>(a, "guarded_update", GuardedUpdate::kUnitRatio, GuardedUpdate::kRawGradient));
  if (read_value<bool>(a, "max_grad_norm/set", false))
    max_grad_norm(read_value<double>(a, "max_grad_norm/value", 1.0));
  else
    max_grad_norm(c10::nullopt);
  decoupled_decay(read_value<bool>(a, "decoupled_decay", false));
  always_adapt(read_value<bool>(a, "always_adapt", true));
  lr_ratio_1d(read_value<double>(a, "lr_ratio_1d", 1.0));
  validate();
}

// ---------------------------------------------------------------- param state

void LayerwiseParamState::serialize(torch::serialize::OutputArchive& archive) const {
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(step);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(momentum_buffer);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(exp_avg_sq);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(name);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(decay);
  _TORCH_OPTIM_SERIALIZE_TORCH_ARG(adapt);
}

void LayerwiseParamState::serialize(torch::serialize::InputArchive& archive) {
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(int64_t, step);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, momentum_buffer);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(torch::Tensor, exp_avg_sq);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(std::string, name);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, decay);
  _TORCH_OPTIM_DESERIALIZE_TORCH_ARG(bool, adapt);
}

// ---------------------------------------------------------------- the engine

namespace {

std::string key_of(const torch::Tensor& p) { return c10::guts::to_string(p.unsafeGetTensorImpl()); }

// Whether a group adapts the tensors of its adaptation mask (timm's always_adapt).
bool adapts_in(const LayerwiseOptions& o) { return o.always_adapt() || o.weight_decay() != 0; }

std::vector<torch::optim::OptimizerParamGroup> groups_of(
    const std::vector<std::pair<NamedParameters, LayerwiseOptions>>& groups) {
  std::vector<torch::optim::OptimizerParamGroup> out;
  for (const auto& g : groups) {
    out.emplace_back(g.first.values(), std::make_unique<LayerwiseOptions>(g.second));
  }
  return out;
}

std::unordered_map<const void*, std::string> names_of(const NamedParameters& params) {
  std::unordered_map<const void*, std::string> names;
  for (const auto& item : params) names[item.value().unsafeGetTensorImpl()] = item.key();
  return names;
}

std::unordered_map<const void*, std::string> names_of(
    const std::vector<std::pair<NamedParameters, LayerwiseOptions>>& groups) {
  std::unordered_map<const void*, std::string> names;
  for (const auto& g : groups)
    for (const auto& item : g.first) names[item.value().unsafeGetTensorImpl()] = item.key();
  return names;
}

}  // namespace

LayerwiseOptimizer::LayerwiseOptimizer(std::vector<torch::optim::OptimizerParamGroup> param_groups,
                                       LayerwiseOptions defaults)
    : Optimizer(std::move(param_groups), std::make_unique<LayerwiseOptions>(defaults)) {
  defaults.validate();
  for (auto& group : param_groups_) static_cast<LayerwiseOptions&>(group.options()).validate();
  init_states({});
}

LayerwiseOptimizer::LayerwiseOptimizer(std::vector<torch::Tensor> params, LayerwiseOptions defaults)
    : LayerwiseOptimizer(std::vector<torch::optim::OptimizerParamGroup>{torch::optim::OptimizerParamGroup(std::move(params))},
                         std::move(defaults)) {}

LayerwiseOptimizer::LayerwiseOptimizer(const NamedParameters& named_params, LayerwiseOptions defaults)
    : Optimizer({torch::optim::OptimizerParamGroup(named_params.values())},
                std::make_unique<LayerwiseOptions>(defaults)) {
  defaults.validate();
  init_states(names_of(named_params));
}

LayerwiseOptimizer::LayerwiseOptimizer(
    const std::vector<std::pair<NamedParameters, LayerwiseOptions>>& groups, LayerwiseOptions defaults)
    : Optimizer(groups_of(groups), std::make_unique<LayerwiseOptions>(defaults)) {
  defaults.validate();
  for (auto& group : param_groups_) static_cast<LayerwiseOptions&>(group.options()).validate();
  init_states(names_of(groups));
}

void LayerwiseOptimizer::init_states(const std::unordered_map<const void*, std::string>& names) {
  int64_t index = 0;
  for (auto& group : param_groups_) {
    const auto& o = static_cast<const LayerwiseOptions&>(group.options());
    for (auto& p : group.params()) {
      auto it = names.find(p.unsafeGetTensorImpl());
      const std::string name = it != names.end() ? it->second : "param." + std::to_string(index);
      ++index;
      auto state = std::make_unique<LayerwiseParamState>();
      state->name(name);
      state->decay(o.decay_mask().applies(name, p.dim()));
      state->adapt(o.adapt_mask().applies(name, p.dim()));
      state_[key_of(p)] = std::move(state);
    }
  }
}

LayerwiseParamState& LayerwiseOptimizer::state_of(const torch::Tensor& param) const {
  auto it = state_.find(key_of(param));
  if (it == state_.end())
    throw std::out_of_range("LayerwiseOptimizer: tensor is not a parameter of this optimizer");
  return static_cast<LayerwiseParamState&>(*it->second);
}

bool LayerwiseOptimizer::decays(const torch::Tensor& p) const { return state_of(p).decay(); }
bool LayerwiseOptimizer::adapts(const torch::Tensor& p) const {
  const bool in_mask = state_of(p).adapt();
  for (const auto& group : param_groups_)
    for (const auto& q : group.params())
      if (q.is_same(p)) return in_mask && adapts_in(static_cast<const LayerwiseOptions&>(group.options()));
  return in_mask;
}
const std::string& LayerwiseOptimizer::name_of(const torch::Tensor& p) const { return state_of(p).name(); }

int64_t LayerwiseOptimizer::steps_taken() const {
  int64_t steps = 0;
  for (const auto& item : state_)
    steps = std::max(steps, static_cast<const LayerwiseParamState&>(*item.second).step());
  return steps;
}

int64_t LayerwiseOptimizer::step_memory_traffic() const {
  int64_t bytes = 0;
  for (const auto& group : param_groups_) {
    const auto& o = static_cast<const LayerwiseOptions&>(group.options());
    int64_t accesses = 3;  // w, g read, w written
    if (o.direction() == Direction::kAdam)
      accesses += 4;  // m, v read and written
    else if (o.momentum() != 0)
      accesses += 2;  // mu read and written
    for (const auto& p : group.params()) bytes += accesses * p.numel() * static_cast<int64_t>(p.element_size());
  }
  return bytes;
}

namespace {

// max_grad_norm: each entry's divisor max(1, |G| / max_grad_norm), |G| the norm over every gradient of the step.
// The fused entries' part is summed on the host in a fixed order; the operations path keeps it on the device, so
// a step without fused entries still never reads a value on the host.
void prenormalise(std::vector<detail::StepEntry>& entries, std::vector<detail::StepEntry>& fused,
                  const std::vector<size_t>& fused_index, const std::vector<size_t>& ops_index) {
  const bool any = std::any_of(entries.begin(), entries.end(),
                               [](const detail::StepEntry& e) { return e.options->max_grad_norm().has_value(); });
  if (!any) return;
  const double fused_squares = fused.empty() ? 0.0 : detail::fused_gradient_squares(fused);
  torch::Tensor total;  // |G| as a device tensor, when the operations path has entries
  if (!ops_index.empty()) {
    const torch::Device device = entries[ops_index.front()].grad.device();
    std::vector<torch::Tensor> norms;
    for (size_t i : ops_index)
      norms.push_back(at::linalg_vector_norm(entries[i].grad, 2, c10::nullopt, false, torch::kDouble).to(device));
    total = (torch::stack(norms).pow(2).sum() + fused_squares).sqrt();
  }
  const double host_total = fused.empty() ? 0.0 : (total.defined() ? total.item<double>() : std::sqrt(fused_squares));
  for (size_t k = 0; k < fused_index.size(); ++k) {
    detail::StepEntry& e = entries[fused_index[k]];
    if (!e.options->max_grad_norm()) continue;
    e.grad_divisor = std::max(1.0, host_total / *e.options->max_grad_norm());
    fused[k].grad_divisor = e.grad_divisor;
  }
  for (size_t i : ops_index) {
    detail::StepEntry& e = entries[i];
    if (!e.options->max_grad_norm()) continue;
    e.grad_divisor_tensor = (total / *e.options->max_grad_norm()).clamp_min(1.0).to(e.grad.device());
  }
}

}  // namespace

torch::Tensor LayerwiseOptimizer::step(LossClosure closure) {
  torch::Tensor loss;
  if (closure) {
    torch::AutoGradMode enable_grad(true);
    loss = closure();
  }
  torch::NoGradGuard no_grad;

  // Gather the tensors that have a gradient, in parameter order.
  std::vector<detail::StepEntry> entries;
  for (auto& group : param_groups_) {
    auto& o = static_cast<LayerwiseOptions&>(group.options());
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      // Parameters added after construction (add_param_group) get their masks on first use.
      auto found = state_.find(key_of(p));
      if (found == state_.end()) {
        auto state = std::make_unique<LayerwiseParamState>();
        state->name("param." + std::to_string(state_.size()));
        state->decay(o.decay_mask().applies(state->name(), p.dim()));
        state->adapt(o.adapt_mask().applies(state->name(), p.dim()));
        found = state_.emplace(key_of(p), std::move(state)).first;
      }
      auto& st = static_cast<LayerwiseParamState&>(*found->second);
      detail::StepEntry e;
      e.param = p;
      e.grad = p.grad();
      e.state = &st;
      e.options = &o;
      e.t = st.step();
      e.phi = o.time_varying() ? tv_phi(*o.time_varying(), e.t) : 1.0;
      e.adapt = st.adapt() && adapts_in(o);
      e.lr = e.adapt ? o.lr() : o.lr() * o.lr_ratio_1d();
      entries.push_back(std::move(e));
    }
  }

  // Split between the fused CPU kernel and per-tensor operations. A tensor whose memory another parameter of
  // this step already uses (listed twice, or views of one storage) goes to the per-tensor path: the fused
  // passes update all tensors at once and would race on it.
  std::vector<detail::StepEntry> fused;
  std::vector<size_t> fused_index, ops_index;
  std::unordered_set<const void*> storages;
  for (size_t i = 0; i < entries.size(); ++i) {
    std::string why = kernel_ == StepKernel::kTensorOps ? "tensor operations chosen" : detail::why_not_fusable(entries[i]);
    if (why.empty() && !storages.insert(entries[i].param.storage().unsafeGetStorageImpl()).second)
      why = "its memory is shared with another parameter";
    if (why.empty()) {
      fused.push_back(entries[i]);
      fused_index.push_back(i);
    } else if (kernel_ == StepKernel::kFused) {
      throw std::invalid_argument("LayerwiseOptimizer: the fused kernel cannot step " + entries[i].state->name() +
                                  ": " + why);
    } else {
      ops_index.push_back(i);
    }
  }

  prenormalise(entries, fused, fused_index, ops_index);

  const bool record = telemetry_enabled_;
  std::vector<detail::LayerNorms> fused_norms;
  if (!fused.empty()) detail::fused_step(fused, record ? &fused_norms : nullptr);
  for (size_t i : fused_index) entries[i].state->step(entries[i].t + 1);
  std::vector<torch::Tensor> recorded(entries.size());  // per adapted tensor of the operations path
  for (size_t i : ops_index) {
    recorded[i] = detail::tensor_ops_step(entries[i], record);
    entries[i].state->step(entries[i].t + 1);  // counters advance with their tensor, even if a later one throws
  }

  if (record) {
    StepTelemetry telemetry;
    if (!entries.empty()) {
      telemetry.step = entries.front().t;
      telemetry.lr = entries.front().options->lr();
      telemetry.phi = entries.front().phi;
    }
    std::vector<detail::LayerNorms> norms(entries.size());
    for (size_t k = 0; k < fused_index.size(); ++k) norms[fused_index[k]] = fused_norms[k];
    // One device-to-host copy for everything the operations path recorded.
    std::vector<torch::Tensor> on_device;
    std::vector<size_t> on_device_index;
    for (size_t i : ops_index)
      if (recorded[i].defined()) {
        on_device.push_back(recorded[i]);
        on_device_index.push_back(i);
      }
    if (!on_device.empty()) {
      const torch::Tensor host = torch::stack(on_device).cpu().contiguous();
      auto acc = host.accessor<double, 2>();
      for (size_t k = 0; k < on_device_index.size(); ++k)
        norms[on_device_index[k]] = detail::LayerNorms{acc[k][0], acc[k][1], acc[k][2], acc[k][3]};
    }
    for (size_t i = 0; i < entries.size(); ++i) {
      if (!entries[i].adapt) continue;
      const detail::LayerNorms& n = norms[i];
      telemetry.layers.push_back(LayerTelemetry{entries[i].state->name(), n.weight, n.update, n.ratio,
                                                entries[i].lr * n.ratio, n.grad});
    }
    last_telemetry_ = std::move(telemetry);
    if (telemetry_callback_) telemetry_callback_(last_telemetry_);
  }
  return loss;
}

void LayerwiseOptimizer::save(torch::serialize::OutputArchive& archive) const {
  torch::optim::serialize<LayerwiseParamState, LayerwiseOptions>(archive, *this);
}

void LayerwiseOptimizer::load(torch::serialize::InputArchive& archive) {
  torch::optim::serialize<LayerwiseParamState, LayerwiseOptions>(archive, *this);
  // LibTorch's loader restores only the state; hyper-parameters and masks are data of the run too.
  torch::serialize::InputArchive groups_archive;
  archive.read("param_groups", groups_archive);
  std::vector<std::pair<std::vector<std::string>, std::unique_ptr<torch::optim::OptimizerOptions>>> saved;
  torch::optim::detail::serialize<LayerwiseOptions>(groups_archive, saved);
  for (size_t i = 0; i < saved.size() && i < param_groups_.size(); ++i) {
    param_groups_[i].set_options(std::move(saved[i].second));
  }
}

// ---------------------------------------------------------------- named faces

namespace {
LayerwiseOptions as_momentum(LayerwiseOptions o) { return o.direction(Direction::kMomentum); }
LayerwiseOptions as_tv(LayerwiseOptions o) {
  o.direction(Direction::kMomentum);
  if (!o.time_varying()) o.time_varying(TimeVarying{});
  return o;
}
LayerwiseOptions as_adam(LayerwiseOptions o) { return o.direction(Direction::kAdam); }
}  // namespace

LARS::LARS(const NamedParameters& params, LayerwiseOptions o) : LayerwiseOptimizer(params, as_momentum(o)) {}
LARS::LARS(std::vector<torch::Tensor> params, LayerwiseOptions o)
    : LayerwiseOptimizer(std::move(params), as_momentum(o)) {}
TVLARS::TVLARS(const NamedParameters& params, LayerwiseOptions o) : LayerwiseOptimizer(params, as_tv(o)) {}
TVLARS::TVLARS(std::vector<torch::Tensor> params, LayerwiseOptions o)
    : LayerwiseOptimizer(std::move(params), as_tv(o)) {}
LAMB::LAMB(const NamedParameters& params, LayerwiseOptions o) : LayerwiseOptimizer(params, as_adam(o)) {}
LAMB::LAMB(std::vector<torch::Tensor> params, LayerwiseOptions o)
    : LayerwiseOptimizer(std::move(params), as_adam(o)) {}

}  // namespace optim
}  // namespace largebatch
