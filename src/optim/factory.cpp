#include <largebatch/optim/factory.h>
#include <largebatch/optim/option_keys.h>

#include <largebatch/optim/recipes.h>

#include <torch/torch.h>

#include <algorithm>
#include <cctype>
#include <sstream>
#include <stdexcept>

namespace largebatch {
namespace optim {

const std::vector<PresetInfo>& layerwise_presets() {
  static const std::vector<PresetInfo> presets = {
      {"lars:reference", "heavy-ball LARS of the released code: m 0.9, wd 5e-4, eta 1e-3, 1-D tensors excluded"},
      {"tvlars:reference",
       "TVLARS as in the reference code (commit 89c3291): phi = 1/(0.1 + exp(lambda (t+1))), lambda 1e-3, norms clamped to [0, 10]"},
      {"tvlars:paper", "TVLARS of the paper: alpha 1, gamma_min = 0.001 B/256, lambda 1e-3, d_e 0, no clamp"},
      {"lamb:reference", "LAMB as released: no bias correction, |w| clamped to [0, 10], eps 1e-6, no masks"},
      {"lamb:paper", "LAMB of You et al.: bias correction, wd 0.01, eps 1e-6, 1-D tensors excluded"},
      {"lars:timm",
       "timm's Lars as its factory groups it: r = eta |w| / (|g| + wd |w| + eps), eps 1e-8; r = 1 where |w| or the raw "
       "|g| is 0 (then LARC-clipped with trust_clip); 1-D tensors plain momentum SGD; a group with wd 0 adapts nothing "
       "(always_adapt off); m 0.9, eta 1e-3, wd 5e-4 (timm's default wd 0 would adapt no tensor)"},
      {"larc:apex",
       "NVIDIA apex's LARC around SGD: every tensor decayed and adapted, r = min(eta |w| / (|g| + wd |w| + eps) / lr, "
       "1), eta 0.02, eps 1e-8; where |w| or |g| is 0 the plain gradient (no decay, no ratio); m 0.9, wd 5e-4"},
      {"lamb:timm",
       "timm's Lamb (NVIDIA FusedLAMB's rule) as its factory groups it: gradients first divided by max(1, global "
       "norm / 1.0), bias correction, eps 1e-6, wd 0.01 coupled; 1-D tensors neither decayed nor adapted"},
      {"lars:barlowtwins",
       "the LARS of the Barlow Twins code with its recipe's groups: lars:reference's rule, wd 1.5e-6, and the 1-D "
       "tensors at lr x 0.024 (0.0048 / 0.2)"},
  };
  return presets;
}

const std::vector<std::string>& torch_optimizer_names() {
  static const std::vector<std::string> names = {"sgd", "adam", "adamw", "adagrad", "rmsprop"};
  return names;
}

namespace {

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

double to_double(const std::string& key, const std::string& value) {
  size_t used = 0;
  double v = 0;
  try {
    v = std::stod(value, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used == 0 || used != value.size())
    throw std::invalid_argument("optimizer option " + key + ": '" + value + "' is not a number");
  return v;
}

bool to_bool(const std::string& key, const std::string& value) {
  const std::string v = lower(value);
  if (v == "true" || v == "1" || v == "on" || v == "yes") return true;
  if (v == "false" || v == "0" || v == "off" || v == "no") return false;
  throw std::invalid_argument("optimizer option " + key + ": '" + value + "' is not a boolean (true/false)");
}

c10::optional<double> to_optional(const std::string& key, const std::string& value) {
  if (lower(value) == "none" || lower(value) == "off" || lower(value) == "null") return c10::nullopt;
  return to_double(key, value);
}

c10::optional<Range> to_range(const std::string& key, const std::string& value) {
  if (lower(value) == "none" || lower(value) == "off") return c10::nullopt;
  const auto colon = value.find(':');
  if (colon == std::string::npos)
    throw std::invalid_argument("optimizer option " + key + ": '" + value + "' is not LO:HI or none");
  return Range{to_double(key, value.substr(0, colon)), to_double(key, value.substr(colon + 1))};
}

TimeVarying& tv_of(LayerwiseOptions& o) {
  if (!o.time_varying()) o.time_varying(TimeVarying{});
  return *o.time_varying();
}

}  // namespace

std::string resolve_optimizer_name(const std::string& raw) { return find_recipe(raw).optimizer; }

bool is_layerwise_preset(const std::string& name) {
  const auto& presets = layerwise_presets();
  return std::any_of(presets.begin(), presets.end(), [&](const PresetInfo& p) { return p.name == name; });
}

LayerwiseOptions preset_options(const std::string& raw, double lr, int64_t batch_size) {
  const std::string name = resolve_optimizer_name(raw);
  if (batch_size <= 0)
    throw std::invalid_argument("invalid batch_size = " + std::to_string(batch_size) + ": must be > 0");
  if (name == "lars:reference") return LayerwiseOptions::lars(lr);
  if (name == "tvlars:reference")
    return LayerwiseOptions::lars(lr)
        .time_varying(TimeVarying{0.1, 1e-3, -1.0, 0.0})
        .weight_norm_clamp(Range{0, 10})
        .update_norm_clamp(Range{0, 10});
  if (name == "tvlars:paper")
    return LayerwiseOptions::lars(lr).time_varying(
        TimeVarying{1.0, 1e-3, 0.0, 0.001 * static_cast<double>(batch_size) / 256.0});
  if (name == "lamb:reference")
    return LayerwiseOptions::lamb(lr)
        .bias_correction(false)
        .weight_decay(5e-4)
        .weight_norm_clamp(Range{0, 10})
        .decay_mask(ParamMask::all())
        .adapt_mask(ParamMask::all());
  if (name == "lamb:paper") return LayerwiseOptions::lamb(lr);
  if (name == "lars:timm")
    return LayerwiseOptions::lars(lr)
        .trust_denominator(TrustDenominator::kSum)
        .trust_eps(1e-8)
        .zero_guard(ZeroGuard::kGradient)
        .guarded_update(GuardedUpdate::kClippedUnitRatio)
        .always_adapt(false);
  if (name == "larc:apex")
    return LayerwiseOptions::lars(lr)
        .eta(0.02)
        .trust_denominator(TrustDenominator::kSum)
        .trust_eps(1e-8)
        .larc_clip(true)
        .zero_guard(ZeroGuard::kGradient)
        .guarded_update(GuardedUpdate::kRawGradient)
        .decay_mask(ParamMask::all())
        .adapt_mask(ParamMask::all());
  if (name == "lamb:timm") return LayerwiseOptions::lamb(lr).max_grad_norm(1.0).always_adapt(false);
  if (name == "lars:barlowtwins") return LayerwiseOptions::lars(lr).weight_decay(1.5e-6).lr_ratio_1d(0.024);
  throw std::invalid_argument("optimizer '" + raw + "' is not a layer-wise preset");
}

std::map<std::string, std::string> parse_overrides(const std::string& text) {
  std::map<std::string, std::string> out;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    const auto eq = item.find('=');
    if (eq == std::string::npos || eq == 0)
      throw std::invalid_argument("optimizer override '" + item + "' is not key=value");
    out[item.substr(0, eq)] = item.substr(eq + 1);
  }
  return out;
}

void apply_overrides(LayerwiseOptions& o, const std::map<std::string, std::string>& overrides) {
  for (const auto& kv : overrides) {
    const std::string& k = kv.first;
    const std::string& v = kv.second;
    if (k == "lr") o.lr(to_double(k, v));
    else if (k == "momentum") o.momentum(to_double(k, v));
    else if (k == "nesterov") o.nesterov(to_bool(k, v));
    else if (k == "beta1") o.beta1(to_double(k, v));
    else if (k == "beta2") o.beta2(to_double(k, v));
    // The peers' vocabulary (docs/optimizers.md): eps is LARS's trust-ratio epsilon and LAMB's Adam epsilon.
    else if (k == "eps" && o.direction() == Direction::kMomentum) o.trust_eps(to_double(k, v));
    else if (k == "eps") o.eps(to_double(k, v));
    else if (k == "betas") {
      const auto colon = v.find(':');
      if (colon == std::string::npos)
        throw std::invalid_argument("optimizer option betas: '" + v + "' is not BETA1:BETA2");
      o.beta1(to_double(k, v.substr(0, colon))).beta2(to_double(k, v.substr(colon + 1)));
    }
    // trust_clip: LARS's LARC clip min(r / lr, 1), LAMB's r <= 1.
    else if (k == "trust_clip" && o.direction() == Direction::kMomentum) o.larc_clip(to_bool(k, v));
    else if (k == "trust_clip") o.trust_ratio_clamp(to_bool(k, v) ? c10::optional<Range>(Range{0, 1}) : c10::nullopt);
    else if (k == "max_grad_norm") o.max_grad_norm(to_optional(k, v));
    else if (k == "decoupled_decay") o.decoupled_decay(to_bool(k, v));
    else if (k == "zero_guard") o.zero_guard(parse_zero_guard(v));
    else if (k == "guarded_update") o.guarded_update(parse_guarded_update(v));
    else if (k == "always_adapt") o.always_adapt(to_bool(k, v));
    else if (k == "lr_ratio_1d") o.lr_ratio_1d(to_double(k, v));
    else if (k == "bias_correction") o.bias_correction(to_bool(k, v));
    else if (k == "weight_decay" || k == "wd") o.weight_decay(to_double(k, v));
    else if (k == "eta") o.eta(to_double(k, v));
    else if (k == "trust_denominator") {
      if (v == "exact") o.trust_denominator(TrustDenominator::kExact);
      else if (v == "sum") o.trust_denominator(TrustDenominator::kSum);
      else throw std::invalid_argument("optimizer option trust_denominator: '" + v + "' is not exact or sum");
    } else if (k == "trust_eps") o.trust_eps(to_double(k, v));
    else if (k == "norm_clamp") { o.weight_norm_clamp(to_range(k, v)); o.update_norm_clamp(to_range(k, v)); }
    else if (k == "weight_norm_clamp") o.weight_norm_clamp(to_range(k, v));
    else if (k == "update_norm_clamp") o.update_norm_clamp(to_range(k, v));
    else if (k == "trust_ratio_clamp") o.trust_ratio_clamp(to_range(k, v));
    else if (k == "larc_clip") o.larc_clip(to_bool(k, v));
    else if (k == "tv") { if (to_bool(k, v)) tv_of(o); else o.time_varying(c10::nullopt); }
    else if (k == "alpha") tv_of(o).alpha = to_double(k, v);
    else if (k == "lambda") tv_of(o).lambda = to_double(k, v);
    else if (k == "delay") tv_of(o).delay = to_double(k, v);
    else if (k == "gamma_min") tv_of(o).gamma_min = to_double(k, v);
    else if (k == "decay_mask") o.decay_mask(ParamMask::parse(v, "optimizer option decay_mask"));
    else if (k == "adapt_mask") o.adapt_mask(ParamMask::parse(v, "optimizer option adapt_mask"));
    else {
      std::string known;
      for (const auto& key : override_keys()) known += (known.empty() ? "" : ", ") + key;
      throw std::invalid_argument("unknown optimizer option '" + k + "' (known: " + known + ")");
    }
  }
  o.validate();
}

const std::vector<std::string>& override_keys() {
  static const std::vector<std::string> keys{
      "lr", "momentum", "nesterov", "beta1", "beta2", "betas", "eps", "bias_correction", "weight_decay", "wd", "eta",
      "trust_denominator", "trust_eps", "norm_clamp", "weight_norm_clamp", "update_norm_clamp", "trust_ratio_clamp",
      "larc_clip", "trust_clip", "zero_guard", "guarded_update", "max_grad_norm", "decoupled_decay", "tv", "alpha",
      "lambda", "delay", "gamma_min", "decay_mask", "adapt_mask", "always_adapt", "lr_ratio_1d"};
  return keys;
}

namespace {

// Split parameters into decayed / not-decayed groups (timm's param_groups_weight_decay).
template <typename Options>
std::vector<torch::optim::OptimizerParamGroup> decay_groups(const NamedParameters& params, const Options& base,
                                                            const ParamMask& mask) {
  std::vector<torch::Tensor> decayed, plain;
  for (const auto& item : params) {
    (mask.applies(item.key(), item.value().dim()) ? decayed : plain).push_back(item.value());
  }
  std::vector<torch::optim::OptimizerParamGroup> groups;
  if (!decayed.empty()) groups.emplace_back(decayed, std::make_unique<Options>(base));
  if (!plain.empty()) {
    Options no_decay = base;
    no_decay.weight_decay(0.0);
    groups.emplace_back(plain, std::make_unique<Options>(no_decay));
  }
  return groups;
}

[[noreturn]] void unknown_key(const std::string& optimizer, const std::string& key, const std::string& known) {
  throw std::invalid_argument("unknown option '" + key + "' for optimizer " + optimizer + " (known: " + known + ")");
}

void check(bool ok, const std::string& option, double value, const std::string& rule) {
  if (ok) return;
  std::ostringstream os;
  os << "invalid optimizer option " << option << " = " << value << ": " << rule;
  throw std::invalid_argument(os.str());
}

}  // namespace

std::unique_ptr<torch::optim::Optimizer> make_optimizer(const OptimizerSpec& spec, const NamedParameters& params) {
  const std::string name = resolve_optimizer_name(spec.name);
  check(spec.lr >= 0 && std::isfinite(spec.lr), "lr", spec.lr, "must be finite and >= 0");
  if (is_layerwise_preset(name)) {
    LayerwiseOptions o = preset_options(name, spec.lr, spec.batch_size);
    apply_overrides(o, spec.overrides);
    return std::make_unique<LayerwiseOptimizer>(params, o);
  }

  // LibTorch's own optimizers. Their weight decay applies to every tensor unless decay_mask says otherwise.
  ParamMask mask = ParamMask::all();
  auto number = [&](const std::string& k, const std::string& v) { return to_double(k, v); };
  if (name == "sgd") {
    torch::optim::SGDOptions o(spec.lr);
    for (const auto& [k, v] : spec.overrides) {
      if (k == "momentum") o.momentum(number(k, v));
      else if (k == "dampening") o.dampening(number(k, v));
      else if (k == "weight_decay" || k == "wd") o.weight_decay(number(k, v));
      else if (k == "nesterov") o.nesterov(to_bool(k, v));
      else if (k == "decay_mask") mask = ParamMask::parse(v, "optimizer option decay_mask");
      else unknown_key(name, k, "momentum, dampening, weight_decay, nesterov, decay_mask");
    }
    check(o.momentum() >= 0 && o.momentum() < 1, "momentum", o.momentum(), "must be in [0, 1)");
    check(o.weight_decay() >= 0, "weight_decay", o.weight_decay(), "must be >= 0");
    check(!o.nesterov() || o.momentum() > 0, "momentum", o.momentum(), "nesterov needs momentum > 0");
    return std::make_unique<torch::optim::SGD>(decay_groups(params, o, mask), o);
  }
  if (name == "adam" || name == "adamw") {
    auto apply = [&](auto& o) {
      double b1 = std::get<0>(o.betas()), b2 = std::get<1>(o.betas());
      for (const auto& [k, v] : spec.overrides) {
        if (k == "beta1") b1 = number(k, v);
        else if (k == "beta2") b2 = number(k, v);
        else if (k == "eps") o.eps(number(k, v));
        else if (k == "weight_decay" || k == "wd") o.weight_decay(number(k, v));
        else if (k == "amsgrad") o.amsgrad(to_bool(k, v));
        else if (k == "decay_mask") mask = ParamMask::parse(v, "optimizer option decay_mask");
        else unknown_key(name, k, "beta1, beta2, eps, weight_decay, amsgrad, decay_mask");
      }
      check(b1 >= 0 && b1 < 1, "beta1", b1, "must be in [0, 1)");
      check(b2 >= 0 && b2 < 1, "beta2", b2, "must be in [0, 1)");
      check(o.eps() >= 0, "eps", o.eps(), "must be >= 0");
      check(o.weight_decay() >= 0, "weight_decay", o.weight_decay(), "must be >= 0");
      o.betas(std::make_tuple(b1, b2));
    };
    if (name == "adam") {
      torch::optim::AdamOptions o(spec.lr);
      apply(o);
      return std::make_unique<torch::optim::Adam>(decay_groups(params, o, mask), o);
    }
    torch::optim::AdamWOptions o(spec.lr);
    apply(o);
    return std::make_unique<torch::optim::AdamW>(decay_groups(params, o, mask), o);
  }
  if (name == "adagrad") {
    torch::optim::AdagradOptions o(spec.lr);
    for (const auto& [k, v] : spec.overrides) {
      if (k == "lr_decay") o.lr_decay(number(k, v));
      else if (k == "weight_decay" || k == "wd") o.weight_decay(number(k, v));
      else if (k == "initial_accumulator_value") o.initial_accumulator_value(number(k, v));
      else if (k == "eps") o.eps(number(k, v));
      else if (k == "decay_mask") mask = ParamMask::parse(v, "optimizer option decay_mask");
      else unknown_key(name, k, "lr_decay, weight_decay, initial_accumulator_value, eps, decay_mask");
    }
    check(o.lr_decay() >= 0, "lr_decay", o.lr_decay(), "must be >= 0");
    check(o.weight_decay() >= 0, "weight_decay", o.weight_decay(), "must be >= 0");
    check(o.eps() >= 0, "eps", o.eps(), "must be >= 0");
    check(o.initial_accumulator_value() >= 0, "initial_accumulator_value", o.initial_accumulator_value(),
          "must be >= 0");
    return std::make_unique<torch::optim::Adagrad>(decay_groups(params, o, mask), o);
  }
  // rmsprop
  torch::optim::RMSpropOptions o(spec.lr);
  for (const auto& [k, v] : spec.overrides) {
    if (k == "alpha") o.alpha(number(k, v));
    else if (k == "eps") o.eps(number(k, v));
    else if (k == "weight_decay" || k == "wd") o.weight_decay(number(k, v));
    else if (k == "momentum") o.momentum(number(k, v));
    else if (k == "centered") o.centered(to_bool(k, v));
    else if (k == "decay_mask") mask = ParamMask::parse(v, "optimizer option decay_mask");
    else unknown_key(name, k, "alpha, eps, weight_decay, momentum, centered, decay_mask");
  }
  check(o.alpha() >= 0 && o.alpha() < 1, "alpha", o.alpha(), "must be in [0, 1)");
  check(o.eps() >= 0, "eps", o.eps(), "must be >= 0");
  check(o.weight_decay() >= 0, "weight_decay", o.weight_decay(), "must be >= 0");
  check(o.momentum() >= 0 && o.momentum() < 1, "momentum", o.momentum(), "must be in [0, 1)");
  return std::make_unique<torch::optim::RMSprop>(decay_groups(params, o, mask), o);
}

}  // namespace optim
}  // namespace largebatch
