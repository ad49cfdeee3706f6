// Unit tests of the layer-wise engine, its presets, masks, serialization, telemetry and the factory.
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <stdexcept>

namespace lo = largebatch::optim;

namespace {

// A tiny model's worth of named parameters: a conv weight, a norm scale, a bias, a linear weight.
lo::NamedParameters make_params(uint64_t seed = 0) {
  torch::manual_seed(seed);
  lo::NamedParameters p;
  p.insert("conv.weight", torch::randn({4, 3, 3, 3}));
  p.insert("bn.weight", torch::ones({4}));
  p.insert("bn.bias", torch::zeros({4}));
  p.insert("fc.weight", torch::randn({5, 4}) * 0.1);
  return p;
}

// Deterministic gradients for step t, independent of the parameters.
void set_grads(lo::NamedParameters& params, int64_t t) {
  int64_t i = 0;
  for (auto& item : params) {
    torch::manual_seed(1000 + 17 * t + i++);
    item.value().mutable_grad() = torch::randn(item.value().sizes());
  }
}

lo::NamedParameters clone_params(const lo::NamedParameters& params) {
  lo::NamedParameters out;
  for (const auto& item : params) out.insert(item.key(), item.value().clone());
  return out;
}

// ------------------------------------------------------------------ zero-norm guard

TEST(TrustRatio, ZeroWeightNormGivesExactlyOne) {
  for (auto options : {lo::preset_options("lars", 1.0), lo::preset_options("lamb:paper", 1.0),
                       lo::preset_options("tvlars:reference", 1.0)}) {
    lo::NamedParameters p;
    p.insert("w", torch::zeros({3, 3}));
    lo::LayerwiseOptimizer opt(p, options);
    opt.set_telemetry(true);
    p["w"].mutable_grad() = torch::ones({3, 3});
    opt.step();
    ASSERT_EQ(opt.last_telemetry().layers.size(), 1u);
    EXPECT_EQ(opt.last_telemetry().layers[0].trust_ratio, 1.0);
    EXPECT_TRUE(torch::isfinite(p["w"]).all().item<bool>());
    EXPECT_TRUE(p["w"].ne(0).all().item<bool>()) << "a zero-initialised tensor must move";
  }
}

TEST(TrustRatio, ZeroUpdateNormGivesExactlyOneAndNoNaN) {
  lo::NamedParameters p;
  p.insert("w", torch::ones({2, 2}));
  lo::LayerwiseOptimizer opt(p, lo::preset_options("lars", 1.0).weight_decay(0));
  opt.set_telemetry(true);
  p["w"].mutable_grad() = torch::zeros({2, 2});
  opt.step();
  EXPECT_EQ(opt.last_telemetry().layers[0].trust_ratio, 1.0);
  EXPECT_TRUE(torch::equal(p["w"], torch::ones({2, 2})));
}

// ------------------------------------------------------------------ hand-checked update rules

TEST(Lars, OneStepMatchesTheFormula) {
  lo::NamedParameters p;
  p.insert("w", torch::tensor({{3.0, 4.0}}, torch::kDouble));  // |w| = 5
  const double lr = 0.5, wd = 0.1, eta = 0.01;
  lo::LayerwiseOptimizer opt(p, lo::LayerwiseOptions::lars(lr).weight_decay(wd).eta(eta));
  p["w"].mutable_grad() = torch::tensor({{1.0, -2.0}}, torch::kDouble);
  opt.step();
  const auto d = torch::tensor({{1.0 + 0.3, -2.0 + 0.4}}, torch::kDouble);
  const double r = eta * 5.0 / d.norm().item<double>();
  EXPECT_TRUE(torch::allclose(p["w"], torch::tensor({{3.0, 4.0}}, torch::kDouble) - lr * r * d, 0, 1e-14));
}

TEST(Lars, SumDenominatorNesterovAndLarcClip) {
  lo::NamedParameters p;
  p.insert("w", torch::tensor({{3.0, 4.0}}, torch::kDouble));
  const double lr = 2.0, wd = 0.1, eta = 0.5, m = 0.9, eps = 1e-3;
  auto o = lo::LayerwiseOptions::lars(lr).weight_decay(wd).eta(eta).momentum(m).nesterov(true).larc_clip(true);
  o.trust_denominator(lo::TrustDenominator::kSum).trust_eps(eps);
  lo::LayerwiseOptimizer opt(p, o);
  const auto g = torch::tensor({{1.0, -2.0}}, torch::kDouble);
  p["w"].mutable_grad() = g;
  opt.step();
  const auto w0 = torch::tensor({{3.0, 4.0}}, torch::kDouble);
  const auto d = g + wd * w0;
  double r = eta * 5.0 / (std::sqrt(5.0) + wd * 5.0 + eps);
  r = std::min(r / lr, 1.0);
  const auto scaled = r * d;
  const auto mu = scaled;  // first step: mu = d
  EXPECT_TRUE(torch::allclose(p["w"], w0 - lr * (scaled + m * mu), 0, 1e-14));
}

TEST(Lamb, OneStepWithBiasCorrectionMatchesTheFormula) {
  lo::NamedParameters p;
  p.insert("w", torch::tensor({{3.0, 4.0}}, torch::kDouble));
  const double lr = 0.1, wd = 0.01, eps = 1e-6;
  lo::LayerwiseOptimizer opt(p, lo::LayerwiseOptions::lamb(lr).weight_decay(wd).eps(eps));
  const auto g = torch::tensor({{1.0, -2.0}}, torch::kDouble);
  p["w"].mutable_grad() = g;
  opt.step();
  const auto w0 = torch::tensor({{3.0, 4.0}}, torch::kDouble);
  const auto m = (1 - 0.9) * g / (1 - 0.9), v = (1 - 0.999) * g * g / (1 - 0.999);
  const auto s = m / (v.sqrt() + eps) + wd * w0;
  const double r = 5.0 / s.norm().item<double>();
  EXPECT_TRUE(torch::allclose(p["w"], w0 - lr * r * s, 0, 1e-14));
}

// ------------------------------------------------------------------ the peers' options, hand-checked

// Two named tensors in double: "w" (2-D, adapted) and "b" (1-D, neither decayed nor adapted by default).
lo::NamedParameters weight_and_bias(const torch::Tensor& w, const torch::Tensor& b) {
  lo::NamedParameters p;
  p.insert("w", w.clone());
  p.insert("b", b.clone());
  return p;
}

const torch::Tensor kW0 = torch::tensor({{3.0, 4.0}}, torch::kDouble);   // |w| = 5
const torch::Tensor kG0 = torch::tensor({{1.0, -2.0}}, torch::kDouble);  // |g| = sqrt 5
const torch::Tensor kB0 = torch::tensor({0.5, -1.0}, torch::kDouble);
const torch::Tensor kGb = torch::tensor({2.0, 2.0}, torch::kDouble);      // |g_b| = sqrt 8

bool near(const torch::Tensor& a, const torch::Tensor& b) { return torch::allclose(a, b, 0, 1e-14); }

TEST(PeerOptions, MaxGradNormDividesEveryGradientByTheGlobalNorm) {
  const double lr = 0.1, wd = 0.01, eps = 1e-6, max_norm = 1.0;
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    auto p = weight_and_bias(kW0, kB0);
    lo::LayerwiseOptimizer opt(p, lo::LayerwiseOptions::lamb(lr).weight_decay(wd).eps(eps).max_grad_norm(max_norm));
    opt.set_kernel(kernel);
    p["w"].mutable_grad() = kG0.clone();
    p["b"].mutable_grad() = kGb.clone();
    opt.step();
    const double c = std::max(1.0, std::sqrt(5.0 + 8.0) / max_norm);  // over both tensors, the 1-D one included
    const auto g = kG0 / c, gb = kGb / c;
    const auto s = g / (g.abs() + eps) + wd * kW0;  // first step with bias correction: m^ = g, v^ = g^2
    const double r = 5.0 / s.norm().item<double>();
    EXPECT_TRUE(near(p["w"], kW0 - lr * r * s)) << p["w"];
    EXPECT_TRUE(near(p["b"], kB0 - lr * (gb / (gb.abs() + eps)))) << p["b"];
    EXPECT_TRUE(near(p["w"].grad(), kG0)) << "the gradient itself is left as it was";
  }
  // Below the threshold the divisor is 1: exactly the step without pre-normalisation.
  auto a = weight_and_bias(kW0, kB0), b = weight_and_bias(kW0, kB0);
  lo::LayerwiseOptimizer with(a, lo::LayerwiseOptions::lamb(0.1).max_grad_norm(100.0));
  lo::LayerwiseOptimizer without(b, lo::LayerwiseOptions::lamb(0.1));
  for (auto* q : {&a, &b}) {
    (*q)["w"].mutable_grad() = kG0.clone();
    (*q)["b"].mutable_grad() = kGb.clone();
  }
  with.step();
  without.step();
  EXPECT_TRUE(torch::equal(a["w"], b["w"]));
  EXPECT_TRUE(torch::equal(a["b"], b["b"]));
}

TEST(PeerOptions, DecoupledDecayScalesTheWeightFirstAndTheRatioSeesIt) {
  const double lr = 0.02, wd = 0.01, eps = 1e-6;
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    auto p = weight_and_bias(kW0, kB0);
    lo::LayerwiseOptimizer opt(p, lo::LayerwiseOptions::lamb(lr).weight_decay(wd).eps(eps).decoupled_decay(true));
    opt.set_kernel(kernel);
    p["w"].mutable_grad() = kG0.clone();
    p["b"].mutable_grad() = kGb.clone();
    opt.step();
    const auto w1 = kW0 * (1 - lr * wd);
    const auto u = kG0 / (kG0.abs() + eps);
    const double r = w1.norm().item<double>() / u.norm().item<double>();
    EXPECT_TRUE(near(p["w"], w1 - lr * r * u)) << p["w"];
    EXPECT_TRUE(near(p["b"], kB0 - lr * (kGb / (kGb.abs() + eps)))) << "the 1-D tensor is not decayed";
  }
}

TEST(PeerOptions, LambTrustClipKeepsTheRatioAtMostOne) {
  const double lr = 0.01, eps = 1e-6;
  for (const bool clip : {false, true}) {
    auto p = weight_and_bias(kW0 * 10, kB0);  // |w| = 50 against |u| about sqrt 2: r about 35 unclipped
    auto o = lo::preset_options("lamb:timm", lr);
    lo::apply_overrides(o, {{"trust_clip", clip ? "true" : "false"}, {"max_grad_norm", "none"}, {"weight_decay", "0.01"}});
    lo::LayerwiseOptimizer opt(p, o);
    opt.set_telemetry(true);
    p["w"].mutable_grad() = kG0.clone();
    p["b"].mutable_grad() = kGb.clone();
    opt.step();
    const auto s = kG0 / (kG0.abs() + eps) + 0.01 * kW0 * 10;
    const double unclipped = 50.0 / s.norm().item<double>();
    ASSERT_GT(unclipped, 1.0);
    const double r = clip ? 1.0 : unclipped;
    EXPECT_NEAR(opt.last_telemetry().layers.at(0).trust_ratio, r, 1e-12);
    EXPECT_TRUE(near(p["w"], kW0 * 10 - lr * r * s));
  }
}

TEST(PeerOptions, TimmLarsGuardsOnTheRawGradientAndClipsTheGuardedRatio) {
  // A zero gradient on an adapted tensor with weight decay: timm's r = 1, then min(1 / lr, 1), times g + wd w.
  const double lr = 2.0, wd = 5e-4;
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    for (const bool clip : {false, true}) {
      auto p = weight_and_bias(kW0, kB0);
      auto o = lo::preset_options("lars:timm", lr);
      lo::apply_overrides(o, {{"trust_clip", clip ? "true" : "false"}, {"momentum", "0"}});
      lo::LayerwiseOptimizer opt(p, o);
      opt.set_kernel(kernel);
      opt.set_telemetry(true);
      p["w"].mutable_grad() = torch::zeros_like(kW0);
      p["b"].mutable_grad() = kGb.clone();
      opt.step();
      const double r = clip ? std::min(1.0 / lr, 1.0) : 1.0;
      EXPECT_EQ(opt.last_telemetry().layers.at(0).trust_ratio, r);
      EXPECT_TRUE(near(p["w"], kW0 - lr * r * (wd * kW0))) << p["w"];
      EXPECT_TRUE(near(p["b"], kB0 - lr * kGb)) << "1-D: plain SGD";
    }
    // The same corner under our guard (the denominator wd |w| + eps is not zero): a real ratio.
    auto p = weight_and_bias(kW0, kB0);
    auto o = lo::preset_options("lars:timm", lr);
    lo::apply_overrides(o, {{"zero_guard", "denominator"}, {"momentum", "0"}});
    lo::LayerwiseOptimizer opt(p, o);
    opt.set_kernel(kernel);
    p["w"].mutable_grad() = torch::zeros_like(kW0);
    p["b"].mutable_grad() = kGb.clone();
    opt.step();
    const double r = 1e-3 * 5.0 / (wd * 5.0 + 1e-8);
    EXPECT_TRUE(near(p["w"], kW0 - lr * r * (wd * kW0))) << p["w"];
  }
}

TEST(PeerOptions, ApexLarcStepsAGuardedTensorWithItsPlainGradient) {
  const double lr = 0.5, wd = 0.1, eta = 0.02, eps = 1e-8;
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    auto p = weight_and_bias(torch::zeros_like(kW0), kB0);  // |w| = 0: no decay, no ratio, d = g
    lo::LayerwiseOptimizer opt(p, lo::preset_options("larc:apex", lr).weight_decay(wd).momentum(0));
    opt.set_kernel(kernel);
    p["w"].mutable_grad() = kG0.clone();
    p["b"].mutable_grad() = torch::zeros_like(kB0);  // |g| = 0: w unchanged (no decay either)
    opt.step();
    EXPECT_TRUE(near(p["w"], -lr * kG0)) << p["w"];
    EXPECT_TRUE(torch::equal(p["b"], kB0)) << p["b"];
    // A tensor with both norms: apex's clipped ratio over the sum denominator, decay included, 1-D too.
    auto q = weight_and_bias(kW0, kB0);
    lo::LayerwiseOptimizer opt2(q, lo::preset_options("larc:apex", lr).weight_decay(wd).momentum(0));
    opt2.set_kernel(kernel);
    q["w"].mutable_grad() = kG0.clone();
    q["b"].mutable_grad() = kGb.clone();
    opt2.step();
    const double r = std::min(eta * 5.0 / (std::sqrt(5.0) + wd * 5.0 + eps) / lr, 1.0);
    EXPECT_TRUE(near(q["w"], kW0 - lr * r * (kG0 + wd * kW0))) << q["w"];
    const double bn = kB0.norm().item<double>();
    const double rb = std::min(eta * bn / (std::sqrt(8.0) + wd * bn + eps) / lr, 1.0);
    EXPECT_TRUE(near(q["b"], kB0 - lr * rb * (kGb + wd * kB0))) << q["b"];
  }
}

TEST(PeerOptions, LarcClipAtZeroLearningRateIsOne) {
  auto p = weight_and_bias(kW0, kB0);
  lo::LayerwiseOptimizer opt(p, lo::preset_options("larc:apex", 0.0));
  opt.set_telemetry(true);
  p["w"].mutable_grad() = kG0.clone();
  p["b"].mutable_grad() = kGb.clone();
  opt.step();
  EXPECT_EQ(opt.last_telemetry().layers.at(0).trust_ratio, 1.0);  // the limit of min(r / lr, 1) as lr -> 0
  EXPECT_TRUE(torch::equal(p["w"], kW0));
}

TEST(PeerOptions, LrRatio1dScalesTheTensorsThatAreNotAdapted) {
  const double lr = 0.4, ratio = 0.024, wd = 1.5e-6, eta = 1e-3;
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    auto p = weight_and_bias(kW0, kB0);
    lo::LayerwiseOptimizer opt(p, lo::preset_options("lars:barlowtwins", lr));
    opt.set_kernel(kernel);
    opt.set_telemetry(true);
    for (int t = 0; t < 2; ++t) {
      p["w"].mutable_grad() = kG0.clone();
      p["b"].mutable_grad() = kGb.clone();
      opt.step();
    }
    // Two steps of heavy-ball momentum: mu_1 = d_0, mu_2 = 0.9 mu_1 + d_1.
    auto w = kW0.clone();
    torch::Tensor mu;
    for (int t = 0; t < 2; ++t) {
      const auto d = kG0 + wd * w;
      const auto r = eta * w.norm().item<double>() / d.norm().item<double>();
      mu = t == 0 ? r * d : 0.9 * mu + r * d;
      w = w - lr * mu;
    }
    EXPECT_TRUE(near(p["w"], w)) << p["w"];
    EXPECT_TRUE(near(p["b"], kB0 - lr * ratio * (kGb + 0.9 * kGb + kGb))) << p["b"];
    EXPECT_DOUBLE_EQ(opt.last_telemetry().layers.at(0).effective_lr, lr * opt.last_telemetry().layers.at(0).trust_ratio);
  }
}

TEST(PeerOptions, AlwaysAdaptOffAdaptsNothingWithoutWeightDecay) {
  auto p = weight_and_bias(kW0, kB0);
  lo::LayerwiseOptimizer opt(p, lo::preset_options("lars:timm", 0.5).weight_decay(0).momentum(0));
  opt.set_telemetry(true);
  EXPECT_FALSE(opt.adapts(p["w"]));
  p["w"].mutable_grad() = kG0.clone();
  p["b"].mutable_grad() = kGb.clone();
  opt.step();
  EXPECT_TRUE(opt.last_telemetry().layers.empty());
  EXPECT_TRUE(near(p["w"], kW0 - 0.5 * kG0)) << "plain SGD, as timm's Lars with weight_decay 0";
  auto q = weight_and_bias(kW0, kB0);
  lo::LayerwiseOptimizer adapting(q, lo::preset_options("lars:timm", 0.5));
  EXPECT_TRUE(adapting.adapts(q["w"]));
  EXPECT_FALSE(adapting.adapts(q["b"]));
}

TEST(PeerOptions, PeerVocabularyParsesAndBadValuesAreNamed) {
  auto o = lo::preset_options("lamb:timm", 0.01);
  lo::apply_overrides(o, {{"betas", "0.8:0.99"}, {"eps", "1e-7"}, {"max_grad_norm", "2.5"}, {"decoupled_decay", "true"}});
  EXPECT_EQ(o.beta1(), 0.8);
  EXPECT_EQ(o.beta2(), 0.99);
  EXPECT_EQ(o.eps(), 1e-7);
  EXPECT_EQ(*o.max_grad_norm(), 2.5);
  EXPECT_TRUE(o.decoupled_decay());
  auto l = lo::preset_options("lars:timm", 1.0);
  lo::apply_overrides(l, {{"eps", "1e-5"}, {"trust_clip", "true"}, {"guarded_update", "raw-gradient"}});
  EXPECT_EQ(l.trust_eps(), 1e-5) << "LARS's eps is the trust-ratio epsilon";
  EXPECT_TRUE(l.larc_clip());
  EXPECT_EQ(l.guarded_update(), lo::GuardedUpdate::kRawGradient);
  for (const auto& [key, value, needle] : std::vector<std::tuple<std::string, std::string, std::string>>{
           {"betas", "0.9", "betas"}, {"max_grad_norm", "0", "max_grad_norm"}, {"zero_guard", "weights", "zero_guard"},
           {"guarded_update", "skip", "guarded_update"}, {"lr_ratio_1d", "-1", "lr_ratio_1d"},
           {"always_adapt", "maybe", "always_adapt"}, {"frobnicate", "1", "frobnicate"}}) {
    auto x = lo::preset_options("lamb:timm", 0.01);
    try {
      lo::apply_overrides(x, {{key, value}});
      ADD_FAILURE() << key << "=" << value << " was accepted";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  }
}

// override_keys() is what apply_overrides() accepts: each listed key is taken (a bad value is refused as a value,
// not as an unknown option), and the error for an unknown one lists them all.
TEST(PeerOptions, TheListedOptionKeysAreExactlyTheAcceptedOnes) {
  const auto& keys = lo::override_keys();
  ASSERT_GE(keys.size(), 30u);
  for (const auto& key : keys) {
    auto o = lo::preset_options("tvlars", 1.0);
    try {
      lo::apply_overrides(o, {{key, "?"}});
    } catch (const std::invalid_argument& e) {
      EXPECT_EQ(std::string(e.what()).find("unknown optimizer option"), std::string::npos) << key << ": " << e.what();
    }
  }
  auto o = lo::preset_options("tvlars", 1.0);
  try {
    lo::apply_overrides(o, {{"frobnicate", "1"}});
    ADD_FAILURE() << "an unknown option was accepted";
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    for (const auto& key : keys) EXPECT_NE(what.find(key), std::string::npos) << key << " not listed: " << what;
  }
}

// ------------------------------------------------------------------ masks

TEST(Masks, DefaultExcludesOneDimensionalTensorsFromBoth) {
  auto p = make_params();
  lo::LayerwiseOptimizer opt(p, lo::preset_options("lars", 1.0));
  EXPECT_TRUE(opt.decays(p["conv.weight"]));
  EXPECT_TRUE(opt.adapts(p["conv.weight"]));
  EXPECT_FALSE(opt.decays(p["bn.weight"]));
  EXPECT_FALSE(opt.adapts(p["bn.bias"]));
  EXPECT_EQ(opt.name_of(p["fc.weight"]), "fc.weight");
}

TEST(Masks, DecayAndAdaptationAreIndependent) {
  auto p = make_params();
  auto o = lo::preset_options("lars", 1.0).decay_mask(lo::ParamMask::all()).adapt_mask(
      lo::ParamMask::parse("ndim<=1;name~^fc\\."));
  lo::LayerwiseOptimizer opt(p, o);
  EXPECT_TRUE(opt.decays(p["bn.bias"]));
  EXPECT_FALSE(opt.adapts(p["bn.bias"]));
  EXPECT_TRUE(opt.decays(p["fc.weight"]));
  EXPECT_FALSE(opt.adapts(p["fc.weight"]));
  EXPECT_TRUE(opt.adapts(p["conv.weight"]));

  // Behaviour, not only flags: a decayed-but-not-adapted tensor takes plain SGD on g + wd w.
  opt.set_telemetry(true);
  const auto before = p["fc.weight"].clone();
  set_grads(p, 0);
  const auto g = p["fc.weight"].grad().clone();
  opt.step();
  EXPECT_TRUE(torch::allclose(p["fc.weight"], before - 1.0 * (g + 5e-4 * before), 0, 1e-6));
  ASSERT_EQ(opt.last_telemetry().layers.size(), 1u);
  EXPECT_EQ(opt.last_telemetry().layers[0].name, "conv.weight");
}

TEST(Masks, ExcludedFromDecayIgnoresWeightDecay) {
  lo::NamedParameters p;
  p.insert("b", torch::ones({3}));
  lo::LayerwiseOptimizer opt(p, lo::preset_options("lars", 1.0).weight_decay(0.5).momentum(0));
  p["b"].mutable_grad() = torch::full({3}, 0.25);
  opt.step();
  EXPECT_TRUE(torch::allclose(p["b"], torch::full({3}, 0.75)));  // no decay, no ratio, no phi
}

TEST(Masks, TextFormRoundTripsAndBadTextIsNamed) {
  for (const std::string text : {"all", "none", "ndim<=1", "ndim<=2;name~bias;name~bn\\."})
    EXPECT_EQ(lo::ParamMask::parse(text).to_string(), text);
  EXPECT_FALSE(lo::ParamMask::none().applies("w", 4));
  EXPECT_TRUE(lo::ParamMask::all().applies("b", 1));
  for (const std::string bad : {"", "ndim<=x", "ndim<=-2", "dims", "name~(", "name~"}) {
    try {
      lo::ParamMask::parse(bad, "decay_mask");
      ADD_FAILURE() << "accepted '" << bad << "'";
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("decay_mask"), std::string::npos) << e.what();
    }
  }
}

// ------------------------------------------------------------------ presets

TEST(Presets, ExactValuesOfAlgorithmsMd) {
  const auto lars = lo::preset_options("lars:reference", 1.0);
  EXPECT_EQ(lars.direction(), lo::Direction::kMomentum);
  EXPECT_EQ(lars.momentum(), 0.9);
  EXPECT_EQ(lars.weight_decay(), 5e-4);
  EXPECT_EQ(lars.eta(), 1e-3);
  EXPECT_EQ(lars.trust_denominator(), lo::TrustDenominator::kExact);
  EXPECT_FALSE(lars.time_varying().has_value());
  EXPECT_FALSE(lars.weight_norm_clamp().has_value());
  EXPECT_EQ(lars.decay_mask(), lo::ParamMask::exclude_1d());
  EXPECT_EQ(lars.adapt_mask(), lo::ParamMask::exclude_1d());

  const auto tvr = lo::preset_options("tvlars:reference", 1.0);
  ASSERT_TRUE(tvr.time_varying().has_value());
  EXPECT_EQ(*tvr.time_varying(), (lo::TimeVarying{0.1, 1e-3, -1.0, 0.0}));
  EXPECT_EQ(*tvr.weight_norm_clamp(), (lo::Range{0, 10}));
  EXPECT_EQ(*tvr.update_norm_clamp(), (lo::Range{0, 10}));
  EXPECT_EQ(tvr.momentum(), 0.9);
  EXPECT_EQ(tvr.eta(), 1e-3);

  const auto tvp = lo::preset_options("tvlars:paper", 1.0, 4096);
  ASSERT_TRUE(tvp.time_varying().has_value());
  EXPECT_EQ(tvp.time_varying()->alpha, 1.0);
  EXPECT_DOUBLE_EQ(tvp.time_varying()->gamma_min, 0.001 * 4096 / 256);
  EXPECT_FALSE(tvp.weight_norm_clamp().has_value());

  const auto lr = lo::preset_options("lamb:reference", 1.0);
  EXPECT_EQ(lr.direction(), lo::Direction::kAdam);
  EXPECT_FALSE(lr.bias_correction());
  EXPECT_EQ(*lr.weight_norm_clamp(), (lo::Range{0, 10}));
  EXPECT_FALSE(lr.update_norm_clamp().has_value());
  EXPECT_EQ(lr.beta1(), 0.9);
  EXPECT_EQ(lr.beta2(), 0.999);
  EXPECT_EQ(lr.eps(), 1e-6);
  EXPECT_EQ(lr.decay_mask(), lo::ParamMask::all());
  EXPECT_EQ(lr.adapt_mask(), lo::ParamMask::all());

  const auto lp = lo::preset_options("lamb:paper", 1.0);
  EXPECT_TRUE(lp.bias_correction());
  EXPECT_FALSE(lp.weight_norm_clamp().has_value());
  EXPECT_EQ(lp.decay_mask(), lo::ParamMask::exclude_1d());
  EXPECT_EQ(lp.eps(), 1e-6);
}

TEST(Presets, AliasesResolve) {
  EXPECT_EQ(lo::resolve_optimizer_name("LARS"), "lars:reference");
  EXPECT_EQ(lo::resolve_optimizer_name("wa-lars"), "lars:reference");
  EXPECT_EQ(lo::resolve_optimizer_name("tvlars"), "tvlars:reference");
  EXPECT_EQ(lo::resolve_optimizer_name("lamb"), "lamb:paper");
  EXPECT_EQ(lo::resolve_optimizer_name("adamw"), "adamw");
}

// ------------------------------------------------------------------ invalid options

void expect_invalid(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "no std::invalid_argument for " << needle;
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << "message: " << e.what();
  }
}

TEST(InvalidOptions, EachIsRejectedWithItsNameAndValue) {
  auto p = make_params();
  auto build = [&](lo::LayerwiseOptions o) { return [=]() { lo::LayerwiseOptimizer opt(p, o); }; };
  const auto lars = lo::preset_options("lars", 1.0);
  const auto lamb = lo::preset_options("lamb", 1.0);
  expect_invalid(build(lo::LayerwiseOptions(lars).lr(-0.5)), "lr = -0.5");
  expect_invalid(build(lo::LayerwiseOptions(lars).lr(NAN)), "lr = nan");
  expect_invalid(build(lo::LayerwiseOptions(lars).momentum(1.0)), "momentum = 1");
  expect_invalid(build(lo::LayerwiseOptions(lars).momentum(-0.1)), "momentum = -0.1");
  expect_invalid(build(lo::LayerwiseOptions(lars).eta(0)), "eta = 0");
  expect_invalid(build(lo::LayerwiseOptions(lars).eta(-1)), "eta = -1");
  expect_invalid(build(lo::LayerwiseOptions(lars).weight_decay(-1e-4)), "weight_decay = -0.0001");
  expect_invalid(build(lo::LayerwiseOptions(lamb).beta1(1.0)), "beta1 = 1");
  expect_invalid(build(lo::LayerwiseOptions(lamb).beta2(-0.1)), "beta2 = -0.1");
  expect_invalid(build(lo::LayerwiseOptions(lamb).eps(-1e-8)), "eps = -1e-08");
  expect_invalid(build(lo::LayerwiseOptions(lars).trust_eps(-1)), "trust_eps = -1");
  expect_invalid(build(lo::LayerwiseOptions(lars).time_varying(lo::TimeVarying{1.0, -0.1, 0, 0})), "lambda = -0.1");
  expect_invalid(build(lo::LayerwiseOptions(lars).time_varying(lo::TimeVarying{0.0, 0.1, 0, 0})), "alpha = 0");
  expect_invalid(build(lo::LayerwiseOptions(lars).time_varying(lo::TimeVarying{-2, 0.1, 0, 0})), "alpha = -2");
  expect_invalid(build(lo::LayerwiseOptions(lars).time_varying(lo::TimeVarying{1, 0.1, 0, -1})), "gamma_min = -1");
  expect_invalid(build(lo::LayerwiseOptions(lars).weight_norm_clamp(lo::Range{5, 1})), "weight_norm_clamp.hi = 1");
  expect_invalid(build(lo::LayerwiseOptions(lars).update_norm_clamp(lo::Range{-1, 1})), "update_norm_clamp.lo = -1");
  expect_invalid(build(lo::LayerwiseOptions(lars).update_norm_clamp(lo::Range{0, 0})), "update_norm_clamp.hi = 0");
  expect_invalid(build(lo::LayerwiseOptions(lamb).weight_norm_clamp(lo::Range{0, 0})), "weight_norm_clamp.hi = 0");
  expect_invalid(build(lo::LayerwiseOptions(lars).momentum(0).nesterov(true)), "nesterov");

  // Per-group options are checked too.
  expect_invalid([&] {
    lo::LayerwiseOptimizer opt({{p, lo::LayerwiseOptions(lars).momentum(2)}}, lars);
  }, "momentum = 2");

  // Names, overrides and factory inputs.
  expect_invalid([] { lo::resolve_optimizer_name("adamax"); }, "unknown optimizer 'adamax'");
  expect_invalid([] { lo::preset_options("lars:paper", 1.0); }, "lars:paper");
  expect_invalid([] { lo::preset_options("lars", 1.0, 0); }, "batch_size = 0");
  expect_invalid([] { lo::parse_overrides("momentum"); }, "momentum");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"mom", "0.9"}}); },
                 "unknown optimizer option 'mom'");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"momentum", "0.9x"}}); },
                 "momentum: '0.9x' is not a number");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"momentum", "1.5"}}); },
                 "momentum = 1.5");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"nesterov", "maybe"}}); },
                 "nesterov: 'maybe'");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"lambda", "-1"}}); },
                 "lambda = -1");
  expect_invalid([] { auto o = lo::preset_options("lars", 1.0); lo::apply_overrides(o, {{"norm_clamp", "10"}}); },
                 "norm_clamp: '10'");
  expect_invalid([&] { lo::make_optimizer({"sgd", 0.1, 256, {{"momentum", "1.2"}}}, p); }, "momentum = 1.2");
  expect_invalid([&] { lo::make_optimizer({"adam", 0.1, 256, {{"beta2", "1"}}}, p); }, "beta2 = 1");
  expect_invalid([&] { lo::make_optimizer({"adamw", -1, 256, {}}, p); }, "lr = -1");
  expect_invalid([&] { lo::make_optimizer({"rmsprop", 0.1, 256, {{"betas", "1"}}}, p); }, "unknown option 'betas'");
  expect_invalid([&] { lo::make_optimizer({"adagrad", 0.1, 256, {{"eps", "-1"}}}, p); }, "eps = -1");
}

// ------------------------------------------------------------------ serialization

// Runs `total` steps straight, and again with a save after `split` steps and a load into a fresh
// optimizer over fresh tensors; the two trajectories must be bit-identical.
void expect_bit_identical_resume(const std::string& preset, int64_t split, int64_t total) {
  SCOPED_TRACE(preset);
  auto straight = make_params();
  auto straight_opt = lo::make_optimizer({preset, 0.5, 1024, {}}, straight);
  for (int64_t t = 0; t < total; ++t) {
    set_grads(straight, t);
    straight_opt->step();
  }

  auto first = make_params();
  auto first_opt = lo::make_optimizer({preset, 0.5, 1024, {}}, first);
  for (int64_t t = 0; t < split; ++t) {
    set_grads(first, t);
    first_opt->step();
  }
  std::stringstream buffer;
  torch::save(*first_opt, buffer);

  auto resumed = clone_params(first);
  // A fresh optimizer built with different hyper-parameters: the checkpoint must restore them.
  auto resumed_opt = lo::make_optimizer({preset, 99.0, 256, {{"weight_decay", "0.3"}}}, resumed);
  torch::load(*resumed_opt, buffer);
  for (int64_t t = split; t < total; ++t) {
    set_grads(resumed, t);
    resumed_opt->step();
  }
  for (const auto& item : straight) {
    EXPECT_TRUE(torch::equal(item.value(), resumed[item.key()])) << item.key() << " differs after resume";
  }
}

TEST(Serialization, MidRunRoundTripIsBitIdentical) {
  for (const auto& preset : lo::layerwise_presets()) expect_bit_identical_resume(preset.name, 3, 7);
}

TEST(Serialization, MasksAndOptionsSurviveACheckpoint) {
  auto p = make_params();
  auto o = lo::preset_options("tvlars:paper", 0.7, 2048)
               .decay_mask(lo::ParamMask::parse("ndim<=1;name~^fc"))
               .adapt_mask(lo::ParamMask::all())
               .larc_clip(true)
               .trust_ratio_clamp(lo::Range{0.01, 10})
               .zero_guard(lo::ZeroGuard::kGradient)
               .guarded_update(lo::GuardedUpdate::kRawGradient)
               .max_grad_norm(3.5)
               .decoupled_decay(true)
               .always_adapt(false)
               .lr_ratio_1d(0.25);
  lo::LayerwiseOptimizer opt(p, o);
  set_grads(p, 0);
  opt.step();
  std::stringstream buffer;
  torch::save(opt, buffer);

  auto q = clone_params(p);
  lo::LayerwiseOptimizer fresh(q, lo::preset_options("lamb", 0.1));  // different masks and options
  torch::load(fresh, buffer);
  const auto& restored = static_cast<const lo::LayerwiseOptions&>(fresh.param_groups()[0].options());
  EXPECT_EQ(restored.describe(), o.describe());
  EXPECT_EQ(*restored.max_grad_norm(), 3.5);
  EXPECT_EQ(restored.guarded_update(), lo::GuardedUpdate::kRawGradient);
  EXPECT_EQ(restored.lr_ratio_1d(), 0.25);
  EXPECT_FALSE(fresh.decays(q["fc.weight"]));
  EXPECT_TRUE(fresh.decays(q["conv.weight"]));
  EXPECT_TRUE(fresh.adapts(q["bn.bias"]));
  EXPECT_EQ(fresh.name_of(q["bn.bias"]), "bn.bias");
  EXPECT_EQ(fresh.steps_taken(), 1);
}

// Options written by an earlier version (fewer keys) load with today's defaults for the missing ones; an enum
// value no version wrote is a damaged checkpoint, refused by name.
TEST(Serialization, EarlierOptionsLoadWithDefaultsAndDamagedEnumsAreRefused) {
  auto archive_of = [](const std::map<std::string, int64_t>& enums) {
    torch::serialize::OutputArchive out;
    out.write("lr", c10::IValue(0.5));
    out.write("momentum", c10::IValue(0.8));
    for (const auto& [key, value] : enums) out.write(key, c10::IValue(value));
    std::stringstream buffer;
    out.save_to(buffer);
    torch::serialize::InputArchive in;
    in.load_from(buffer);
    return in;
  };
  lo::LayerwiseOptions old_version(0.1);
  auto in = archive_of({});
  old_version.serialize(in);
  EXPECT_DOUBLE_EQ(old_version.lr(), 0.5);
  EXPECT_DOUBLE_EQ(old_version.momentum(), 0.8);
  EXPECT_EQ(old_version.direction(), lo::Direction::kMomentum);
  EXPECT_EQ(old_version.trust_denominator(), lo::TrustDenominator::kExact);
  EXPECT_EQ(old_version.zero_guard(), lo::ZeroGuard::kDenominator);
  EXPECT_EQ(old_version.guarded_update(), lo::GuardedUpdate::kUnitRatio);
  EXPECT_FALSE(old_version.decoupled_decay());
  EXPECT_FALSE(old_version.max_grad_norm().has_value());
  for (const std::string key : {"direction", "trust_denominator", "zero_guard", "guarded_update"}) {
    for (const int64_t damaged : {-1, 7}) {
      lo::LayerwiseOptions o(0.1);
      auto bad = archive_of({{key, damaged}});
      try {
        o.serialize(bad);
        ADD_FAILURE() << key << " = " << damaged << " was accepted";
      } catch (const std::invalid_argument& e) {
        EXPECT_NE(std::string(e.what()).find("checkpoint optimizer option " + key + " = " + std::to_string(damaged)),
                  std::string::npos) << e.what();
      }
    }
  }
}

// ------------------------------------------------------------------ telemetry

TEST(Telemetry, OffByDefaultAndRecordsAdaptedTensorsWhenOn) {
  auto p = make_params();
  lo::LayerwiseOptimizer opt(p, lo::preset_options("tvlars:reference", 2.0));
  EXPECT_FALSE(opt.telemetry_enabled());
  set_grads(p, 0);
  opt.step();
  EXPECT_TRUE(opt.last_telemetry().layers.empty());

  int calls = 0;
  opt.set_telemetry(true);
  opt.set_telemetry_callback([&](const lo::StepTelemetry&) { ++calls; });
  set_grads(p, 1);
  const auto w = p["conv.weight"].clone();
  const auto d = p["conv.weight"].grad() + 5e-4 * w;
  opt.step();
  const auto& tel = opt.last_telemetry();
  EXPECT_EQ(calls, 1);
  EXPECT_EQ(tel.step, 1);
  EXPECT_DOUBLE_EQ(tel.lr, 2.0);
  EXPECT_DOUBLE_EQ(tel.phi, lo::tv_phi({0.1, 1e-3, -1, 0}, 1));
  ASSERT_EQ(tel.layers.size(), 2u);  // conv.weight and fc.weight
  const auto& conv = tel.layers[0];
  EXPECT_EQ(conv.name, "conv.weight");
  EXPECT_NEAR(conv.weight_norm, w.norm().item<double>(), 1e-5);
  EXPECT_NEAR(conv.update_norm, d.norm().item<double>(), 1e-4);
  const double expected_r = 1e-3 * tel.phi * std::min(conv.weight_norm, 10.0) / std::min(conv.update_norm, 10.0);
  EXPECT_NEAR(conv.trust_ratio, expected_r, 1e-6 * expected_r);
  EXPECT_DOUBLE_EQ(conv.effective_lr, 2.0 * conv.trust_ratio);
}

// ------------------------------------------------------------------ recipes

const lo::LayerwiseOptions& group_options(const torch::optim::Optimizer& opt) {
  return static_cast<const lo::LayerwiseOptions&>(opt.param_groups()[0].options());
}

TEST(Recipes, EveryRecipeBuildsForEveryTask) {
  torch::nn::Linear model(8, 4);
  for (const auto& name : lo::recipe_names()) {
    for (const auto task : {lo::Task::kClassification, lo::Task::kSelfSupervised}) {
      SCOPED_TRACE(name);
      const auto r = lo::resolve_recipe(name, task, 1024, 300, -1, "auto", {});
      EXPECT_GT(r.lr, 0);
      EXPECT_TRUE(r.schedule == "constant" || r.schedule == "warmup-cosine") << r.schedule;
      EXPECT_NO_THROW(lo::make_optimizer({r.optimizer, r.lr, 1024, r.options}, model->named_parameters()));
    }
  }
  // Every engine preset and every LibTorch optimizer is reachable by its own name.
  const auto names = lo::recipe_names();
  for (const auto& p : lo::layerwise_presets())
    EXPECT_NE(std::find(names.begin(), names.end(), p.name), names.end()) << p.name;
  for (const auto& n : lo::torch_optimizer_names())
    EXPECT_NE(std::find(names.begin(), names.end(), n), names.end()) << n;
}

TEST(Recipes, AnExplicitPresetRunsWithExactlyItsValues) {
  torch::nn::Linear model(8, 4);
  for (const auto& p : lo::layerwise_presets()) {
    SCOPED_TRACE(p.name);
    const auto r = lo::resolve_recipe(p.name, lo::Task::kClassification, 4096, 300, 1.5, "auto", {});
    EXPECT_EQ(r.optimizer, p.name);
    EXPECT_TRUE(r.options.empty());
    // A preset's values are its own; its schedule is constant, except the Barlow Twins recipe's, which is part of
    // what that peer is.
    EXPECT_EQ(r.schedule, p.name == "lars:barlowtwins" ? "warmup-cosine" : "constant");
    auto opt = lo::make_optimizer({r.optimizer, r.lr, 4096, r.options}, model->named_parameters());
    EXPECT_EQ(group_options(*opt).describe(), lo::preset_options(p.name, 1.5, 4096).describe());
  }
  const auto paper = lo::resolve_recipe("tvlars:paper", lo::Task::kClassification, 4096, 300, -1, "auto", {});
  auto opt = lo::make_optimizer({paper.optimizer, paper.lr, 4096, paper.options}, model->named_parameters());
  EXPECT_DOUBLE_EQ(group_options(*opt).eta(), 1e-3);
  EXPECT_DOUBLE_EQ(group_options(*opt).time_varying()->lambda, 1e-3);
  EXPECT_DOUBLE_EQ(group_options(*opt).time_varying()->gamma_min, 0.001 * 4096 / 256);
}

TEST(Recipes, BarlowTwinsRecipeScalesItsLearningRateWithTheBatch) {
  const auto r = lo::resolve_recipe("lars:barlowtwins", lo::Task::kSelfSupervised, 2048, 100, -1, "auto", {});
  EXPECT_EQ(r.optimizer, "lars:barlowtwins");
  EXPECT_DOUBLE_EQ(r.lr, 0.2 * 2048 / 256);  // its --learning-rate-weights 0.2 times B / 256
  EXPECT_EQ(r.schedule, "warmup-cosine");
  EXPECT_EQ(lo::find_recipe("lars:barlowtwins").self_supervised.lr.describe(), "0.2 B/256");
  const auto o = lo::preset_options("lars:barlowtwins", r.lr);
  EXPECT_DOUBLE_EQ(o.lr_ratio_1d(), 0.024);
  EXPECT_DOUBLE_EQ(o.weight_decay(), 1.5e-6);
}

TEST(Recipes, TheTrainersRecipesSayWhatTheyChange) {
  const auto tv = lo::resolve_recipe("TVLARS", lo::Task::kClassification, 4096, 1000, -1, "auto", {});
  EXPECT_EQ(tv.recipe, "tvlars");
  EXPECT_EQ(tv.optimizer, "tvlars:reference");
  EXPECT_DOUBLE_EQ(tv.lr, 2.0);
  EXPECT_EQ(tv.options.at("eta"), "0.002");
  EXPECT_EQ(tv.options.at("lambda"), "0.002");  // 2 / T
  EXPECT_NE(lo::find_recipe("tvlars").description.find("eta 2e-3"), std::string::npos);
  // Pre-training keeps the preset's eta.
  const auto tv_ssl = lo::resolve_recipe("tvlars", lo::Task::kSelfSupervised, 512, 400, -1, "auto", {});
  EXPECT_EQ(tv_ssl.options.count("eta"), 0u);
  EXPECT_DOUBLE_EQ(tv_ssl.lr, 0.2);
  // The run's own options and schedule win; wa- names are the warm-up recipes.
  const auto given = lo::resolve_recipe("tvlars", lo::Task::kClassification, 4096, 1000, 3, "cosine",
                                        {{"eta", "1e-3"}, {"lambda", "0.01"}});
  EXPECT_EQ(given.options.at("eta"), "1e-3");
  EXPECT_EQ(given.options.at("lambda"), "0.01");
  EXPECT_DOUBLE_EQ(given.lr, 3);
  EXPECT_EQ(given.schedule, "cosine");
  // lambda = C/T: C over the run's steps, so one grid value decays phi alike over runs of any length.
  EXPECT_EQ(lo::resolve_recipe("tvlars", lo::Task::kClassification, 4096, 1000, -1, "auto", {{"lambda", "4/T"}})
                .options.at("lambda"), "0.004");
  EXPECT_EQ(lo::resolve_recipe("tvlars:paper", lo::Task::kClassification, 1024, 36, -1, "auto", {{"lambda", "0.5/T"}})
                .options.at("lambda"), "0.0138889");
  for (const std::string bad : {"x/T", "-1/T", "0/T", "2/Tx"}) {
    try {
      const auto r = lo::resolve_recipe("tvlars", lo::Task::kClassification, 4096, 1000, -1, "auto", {{"lambda", bad}});
      if (bad == "2/Tx") continue;  // not the C/T form: passed on, refused by the preset's option parser
      ADD_FAILURE() << bad << " resolved to " << r.options.at("lambda");
    } catch (const std::invalid_argument& e) {
      EXPECT_NE(std::string(e.what()).find("--opt lambda=" + bad), std::string::npos) << e.what();
    }
  }
  // T unknown (0, a schedule check before the data is read): checked and left as given.
  EXPECT_EQ(lo::resolve_recipe("tvlars", lo::Task::kClassification, 4096, 0, -1, "auto", {{"lambda", "2/T"}})
                .options.at("lambda"), "2/T");
  EXPECT_EQ(lo::resolve_recipe("walars", lo::Task::kClassification, 256, 10, -1, "auto", {}).schedule, "warmup-cosine");
  EXPECT_EQ(lo::resolve_recipe("lars", lo::Task::kClassification, 256, 10, -1, "auto", {}).schedule, "constant");
  const auto sgd = lo::resolve_recipe("sgd", lo::Task::kClassification, 1024, 10, -1, "auto", {});
  EXPECT_DOUBLE_EQ(sgd.lr, 0.2);  // 0.1 sqrt(1024 / 256)
  EXPECT_EQ(sgd.options.at("decay_mask"), "ndim<=1");
  EXPECT_EQ(sgd.schedule, "warmup-cosine");
  try {
    lo::find_recipe("adamax");
    ADD_FAILURE() << "adamax resolved";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("unknown optimizer 'adamax' (known: lars:reference"), std::string::npos) << e.what();
  }
}

// ------------------------------------------------------------------ factory

TEST(Factory, BuildsEveryOptimizerAndTheyTrain) {
  std::vector<std::string> names;
  for (const auto& p : lo::layerwise_presets()) names.push_back(p.name);
  for (const auto& n : lo::torch_optimizer_names()) names.push_back(n);
  for (const auto& name : names) {
    SCOPED_TRACE(name);
    torch::manual_seed(0);
    torch::nn::Linear model(8, 1);
    const auto x = torch::randn({64, 8});
    const auto y = x.sum(1, true);
    const bool lars_family = lo::is_layerwise_preset(name) && lo::preset_options(name, 1).direction() == lo::Direction::kMomentum;
    const double lr = lars_family ? 0.1 : 0.01;
    auto opt = lo::make_optimizer({name, lr, 64, {}}, model->named_parameters());
    double first = 0, last = 0;
    for (int i = 0; i < 60; ++i) {
      opt->zero_grad();
      auto loss = torch::mse_loss(model(x), y);
      loss.backward();
      opt->step();
      (i == 0 ? first : last) = loss.item<double>();
    }
    EXPECT_LT(last, first) << "loss did not fall";
  }
}

TEST(Factory, OverridesApplyAndTorchOptimizersGetDecayGroups) {
  auto p = make_params();
  auto opt = lo::make_optimizer({"tvlars", 1.0, 512, {{"lambda", "0.05"}, {"norm_clamp", "none"}, {"nesterov", "on"}}}, p);
  const auto& o = static_cast<const lo::LayerwiseOptions&>(opt->param_groups()[0].options());
  EXPECT_EQ(o.time_varying()->lambda, 0.05);
  EXPECT_FALSE(o.weight_norm_clamp().has_value());
  EXPECT_TRUE(o.nesterov());

  auto sgd = lo::make_optimizer({"sgd", 0.1, 256, {{"weight_decay", "1e-4"}, {"decay_mask", "ndim<=1"}}}, p);
  ASSERT_EQ(sgd->param_groups().size(), 2u);
  const auto& decayed = static_cast<const torch::optim::SGDOptions&>(sgd->param_groups()[0].options());
  const auto& plain = static_cast<const torch::optim::SGDOptions&>(sgd->param_groups()[1].options());
  EXPECT_EQ(decayed.weight_decay(), 1e-4);
  EXPECT_EQ(plain.weight_decay(), 0.0);
  EXPECT_EQ(sgd->param_groups()[1].params().size(), 2u);  // bn.weight, bn.bias

  lo::set_learning_rate(*sgd, 0.25);
  for (const auto& g : sgd->param_groups()) EXPECT_EQ(g.options().get_lr(), 0.25);
}

// ------------------------------------------------------------------ step kernels

// Parameters large enough to span several of the fused kernel's chunks, in float and double.
lo::NamedParameters kernel_params(torch::ScalarType type) {
  torch::manual_seed(7);
  lo::NamedParameters p;
  p.insert("conv.weight", torch::randn({64, 32, 3, 3}, type) * 0.1);  // 18432 elements
  p.insert("fc.weight", torch::randn({300, 400}, type) * 0.05);       // 120000: 15 chunks, a block of its own
  p.insert("fc.bias", torch::randn({300}, type) * 0.01);
  p.insert("zero.weight", torch::zeros({10, 10}, type));               // |w| = 0: r = 1
  return p;
}

void kernel_grads(lo::NamedParameters& params, int64_t t) {
  int64_t i = 0;
  for (auto& item : params) {
    torch::manual_seed(500 + 13 * t + i++);
    item.value().mutable_grad() = torch::randn(item.value().sizes(), item.value().options()) * 0.1;
  }
}

// Runs `steps` steps with one kernel and returns the parameters and every telemetry record.
std::pair<lo::NamedParameters, std::vector<lo::StepTelemetry>> run_kernel(const lo::LayerwiseOptions& o,
                                                                          lo::StepKernel kernel,
                                                                          torch::ScalarType type, int steps) {
  auto p = kernel_params(type);
  lo::LayerwiseOptimizer opt(p, o);
  opt.set_kernel(kernel);
  opt.set_telemetry(true);
  std::vector<lo::StepTelemetry> records;
  for (int t = 0; t < steps; ++t) {
    kernel_grads(p, t);
    opt.step();
    records.push_back(opt.last_telemetry());
  }
  return {p, records};
}

// Options the golden files do not cover, one case each.
std::vector<std::pair<std::string, lo::LayerwiseOptions>> every_option_case() {
  return {
      {"lars", lo::LayerwiseOptions::lars(2.0)},
      {"lars nesterov sum larc", lo::LayerwiseOptions::lars(2.0).nesterov(true).larc_clip(true).trust_denominator(
                                     lo::TrustDenominator::kSum).trust_eps(1e-3)},
      {"lars no momentum, clamps", lo::LayerwiseOptions::lars(1.0).momentum(0).weight_norm_clamp(lo::Range{0, 2})
                                       .update_norm_clamp(lo::Range{0.5, 10}).trust_ratio_clamp(lo::Range{0, 0.01})},
      {"tvlars", lo::LayerwiseOptions::lars(2.0).time_varying(lo::TimeVarying{})},
      {"lamb", lo::LayerwiseOptions::lamb(0.01)},
      {"lamb sum, no bias correction, all adapted",
       lo::LayerwiseOptions::lamb(0.01).bias_correction(false).trust_denominator(lo::TrustDenominator::kSum)
           .adapt_mask(lo::ParamMask::all()).decay_mask(lo::ParamMask::all())},
      {"lars:timm nesterov trust clip", lo::preset_options("lars:timm", 1.0).nesterov(true).larc_clip(true)},
      {"larc:apex", lo::preset_options("larc:apex", 0.5)},
      {"lamb:timm (max_grad_norm)", lo::preset_options("lamb:timm", 0.01).max_grad_norm(0.5)},
      {"lamb decoupled trust clip", lo::preset_options("lamb:timm", 0.01).decoupled_decay(true)
           .trust_ratio_clamp(lo::Range{0, 1})},
      {"lars:barlowtwins", lo::preset_options("lars:barlowtwins", 0.5)},
      {"lars decoupled, max_grad_norm, raw-gradient guard",
       lo::LayerwiseOptions::lars(2.0).decoupled_decay(true).max_grad_norm(0.3).zero_guard(lo::ZeroGuard::kGradient)
           .guarded_update(lo::GuardedUpdate::kRawGradient)},
  };
}

TEST(StepKernels, FusedAgreesWithTensorOperationsForEveryOption) {
  const auto cases = every_option_case();
  for (const auto type : {torch::kFloat, torch::kDouble}) {
    const double tol = type == torch::kFloat ? 2e-5 : 1e-12;
    for (const auto& [label, o] : cases) {
      SCOPED_TRACE(label + (type == torch::kFloat ? " float" : " double"));
      auto [fused, fused_tel] = run_kernel(o, lo::StepKernel::kFused, type, 5);
      auto [ops, ops_tel] = run_kernel(o, lo::StepKernel::kTensorOps, type, 5);
      for (const auto& item : fused) {
        const auto& other = ops[item.key()];
        const double scale = other.abs().max().item<double>() + 1e-12;
        EXPECT_LE((item.value() - other).abs().max().item<double>(), tol * scale) << item.key();
        EXPECT_FALSE(torch::equal(item.value(), kernel_params(type)[item.key()])) << item.key() << " did not move";
      }
      for (size_t t = 0; t < fused_tel.size(); ++t) {
        ASSERT_EQ(fused_tel[t].layers.size(), ops_tel[t].layers.size());
        EXPECT_EQ(fused_tel[t].step, ops_tel[t].step);
        EXPECT_EQ(fused_tel[t].phi, ops_tel[t].phi);
        for (size_t k = 0; k < fused_tel[t].layers.size(); ++k) {
          const auto& a = fused_tel[t].layers[k];
          const auto& b = ops_tel[t].layers[k];
          EXPECT_EQ(a.name, b.name);
          EXPECT_NEAR(a.weight_norm, b.weight_norm, tol * b.weight_norm + 1e-12) << a.name;
          EXPECT_NEAR(a.update_norm, b.update_norm, tol * b.update_norm + 1e-12) << a.name;
          EXPECT_NEAR(a.trust_ratio, b.trust_ratio, tol * b.trust_ratio + 1e-12) << a.name;
          EXPECT_NEAR(a.grad_norm, b.grad_norm, tol * b.grad_norm + 1e-12) << a.name;
        }
      }
      // The zero tensor keeps r = 1 on both paths.
      for (const auto& l : fused_tel[0].layers)
        if (l.name == "zero.weight") EXPECT_EQ(l.trust_ratio, 1.0);
    }
  }
}

TEST(StepKernels, FusedResultsDoNotDependOnTheThreadCount) {
  const int before = torch::get_num_threads();
  torch::set_num_threads(1);
  auto [one, one_tel] = run_kernel(lo::LayerwiseOptions::lamb(0.01), lo::StepKernel::kFused, torch::kFloat, 3);
  torch::set_num_threads(2);
  auto [two, two_tel] = run_kernel(lo::LayerwiseOptions::lamb(0.01), lo::StepKernel::kFused, torch::kFloat, 3);
  torch::set_num_threads(before);
  for (const auto& item : one) EXPECT_TRUE(torch::equal(item.value(), two[item.key()])) << item.key();
  for (size_t k = 0; k < one_tel.back().layers.size(); ++k)
    EXPECT_EQ(one_tel.back().layers[k].update_norm, two_tel.back().layers[k].update_norm);
}

TEST(StepKernels, FusedResultsDoNotDependOnTheBlockSize) {
  // 1 byte: every tensor a block of its own; 1 GiB: the whole step one block; and the default from the caches.
  const int before = torch::get_num_threads();
  torch::set_num_threads(2);
  for (const auto& [label, o] : every_option_case()) {
    SCOPED_TRACE(label);
    lo::use_fused_step_block_bytes(0);
    auto [base, base_tel] = run_kernel(o, lo::StepKernel::kFused, torch::kFloat, 3);
    for (const int64_t bytes : {int64_t{1}, int64_t{100000}, int64_t{1} << 30}) {
      lo::use_fused_step_block_bytes(bytes);
      EXPECT_EQ(lo::fused_step_block_bytes(), bytes);
      auto [other, other_tel] = run_kernel(o, lo::StepKernel::kFused, torch::kFloat, 3);
      for (const auto& item : base) EXPECT_TRUE(torch::equal(item.value(), other[item.key()])) << bytes << " " << item.key();
      for (size_t t = 0; t < base_tel.size(); ++t)
        for (size_t l = 0; l < base_tel[t].layers.size(); ++l) {
          EXPECT_EQ(base_tel[t].layers[l].weight_norm, other_tel[t].layers[l].weight_norm) << bytes;
          EXPECT_EQ(base_tel[t].layers[l].update_norm, other_tel[t].layers[l].update_norm) << bytes;
          EXPECT_EQ(base_tel[t].layers[l].trust_ratio, other_tel[t].layers[l].trust_ratio) << bytes;
        }
    }
  }
  lo::use_fused_step_block_bytes(0);
  torch::set_num_threads(before);
  EXPECT_THROW(lo::use_fused_step_block_bytes(-1), std::invalid_argument);
}

TEST(StepKernels, BlockBudgetIsHalfTheL2OfOneCpuOrTheEnvironmentVariable) {
  if (std::getenv("LARGEBATCH_STEP_BLOCK_BYTES")) GTEST_SKIP() << "SKIP: LARGEBATCH_STEP_BLOCK_BYTES is set";
  const lo::CpuCaches caches = lo::cpu_caches();
  lo::use_fused_step_block_bytes(0);
  if (caches.l2_bytes > 0)
    EXPECT_EQ(lo::fused_step_block_bytes(), std::max<int64_t>(64 << 10, caches.l2_bytes / caches.l2_shared_by / 2));
  else
    EXPECT_EQ(lo::fused_step_block_bytes(), 512 << 10);
  ::setenv("LARGEBATCH_STEP_BLOCK_BYTES", "3M", 1);
  lo::use_fused_step_block_bytes(0);
  EXPECT_EQ(lo::fused_step_block_bytes(), 3 << 20);
  ::setenv("LARGEBATCH_STEP_BLOCK_BYTES", "lots", 1);
  lo::use_fused_step_block_bytes(0);
  try {
    (void)lo::fused_step_block_bytes();
    ADD_FAILURE() << "a bad LARGEBATCH_STEP_BLOCK_BYTES was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("LARGEBATCH_STEP_BLOCK_BYTES: 'lots'"), std::string::npos) << e.what();
  }
  ::unsetenv("LARGEBATCH_STEP_BLOCK_BYTES");
  lo::use_fused_step_block_bytes(0);
  EXPECT_GT(lo::fused_step_block_bytes(), 0);
}

TEST(StepKernels, ByteCountsAndCaches) {
  EXPECT_EQ(lo::parse_byte_count("524288", "x"), 524288);
  EXPECT_EQ(lo::parse_byte_count("512K", "x"), 512 << 10);
  EXPECT_EQ(lo::parse_byte_count("2M", "x"), 2 << 20);
  EXPECT_EQ(lo::parse_byte_count("1MiB", "x"), 1 << 20);
  for (const char* bad : {"", "-1", "1.5M", "12Q", "M"}) EXPECT_THROW(lo::parse_byte_count(bad, "--block-bytes"), std::invalid_argument) << bad;
  const lo::CpuCaches c = lo::cpu_caches();
  std::cout << "[ INFO     ] caches (" << c.source << "): L1d " << c.l1d_bytes << ", L2 " << c.l2_bytes << " per "
            << c.l2_shared_by << ", L3 " << c.l3_bytes << " per " << c.l3_shared_by << "\n";
  std::ifstream sysfs("/sys/devices/system/cpu/cpu0/cache/index0/level");
  if (!sysfs) GTEST_SKIP() << "SKIP: this system has no /sys/devices/system/cpu/cpu0/cache";
  EXPECT_EQ(c.source, "sysfs");
  EXPECT_GT(c.l1d_bytes, 0);
  EXPECT_GE(c.l2_shared_by, 1);
  EXPECT_GE(c.l3_shared_by, 1);
}

TEST(StepKernels, EveryInstructionSetGivesTheSameBits) {
  const auto sets = lo::fused_step_instruction_sets();
  ASSERT_FALSE(sets.empty());
  EXPECT_EQ(sets.front(), "baseline");
  const std::string before = lo::fused_step_instruction_set();
  if (!std::getenv("LARGEBATCH_STEP_SIMD")) EXPECT_EQ(before, sets.back()) << "the widest set this CPU runs is the default";
  if (sets.size() == 1) std::cout << "[ INFO     ] only the baseline set runs here: nothing to compare\n";
  std::cout << "[ INFO     ] instruction sets: ";
  for (const auto& name : sets) std::cout << name << " ";
  std::cout << "\n";
  for (const auto type : {torch::kFloat, torch::kDouble}) {
    for (const auto& [label, o] : every_option_case()) {
      SCOPED_TRACE(label + (type == torch::kFloat ? " float" : " double"));
      lo::use_fused_step_instruction_set("baseline");
      auto [base, base_tel] = run_kernel(o, lo::StepKernel::kFused, type, 3);
      for (size_t k = 1; k < sets.size(); ++k) {
        lo::use_fused_step_instruction_set(sets[k]);
        auto [other, other_tel] = run_kernel(o, lo::StepKernel::kFused, type, 3);
        for (const auto& item : base)
          EXPECT_TRUE(torch::equal(item.value(), other[item.key()])) << sets[k] << " " << item.key();
        for (size_t t = 0; t < base_tel.size(); ++t)
          for (size_t l = 0; l < base_tel[t].layers.size(); ++l) {
            EXPECT_EQ(base_tel[t].layers[l].weight_norm, other_tel[t].layers[l].weight_norm) << sets[k];
            EXPECT_EQ(base_tel[t].layers[l].update_norm, other_tel[t].layers[l].update_norm) << sets[k];
            EXPECT_EQ(base_tel[t].layers[l].grad_norm, other_tel[t].layers[l].grad_norm) << sets[k];
          }
      }
    }
  }
  lo::use_fused_step_instruction_set(before);
  try {
    lo::use_fused_step_instruction_set("sse9");
    FAIL() << "an unknown instruction set was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("'sse9'"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("baseline"), std::string::npos) << e.what();
  }
  EXPECT_EQ(lo::fused_step_instruction_set(), before);
}

TEST(StepKernels, AutoFallsBackPerTensorAndFusedNamesWhatItCannotTake) {
  auto make = [] {
    lo::NamedParameters p;
    p.insert("dense.weight", torch::ones({8, 8}));
    p.insert("strided.weight", torch::ones({8, 8}));
    return p;
  };
  auto grads = [](lo::NamedParameters& p) {
    p["dense.weight"].mutable_grad() = torch::full({8, 8}, 0.5);
    p["strided.weight"].mutable_grad() = torch::full({8, 16}, 0.5).slice(1, 0, 16, 2);  // not contiguous
  };
  auto a = make(), b = make();
  lo::LayerwiseOptimizer automatic(a, lo::LayerwiseOptions::lars(1.0));
  lo::LayerwiseOptimizer reference(b, lo::LayerwiseOptions::lars(1.0));
  reference.set_kernel(lo::StepKernel::kTensorOps);
  grads(a);
  grads(b);
  automatic.step();
  reference.step();
  for (const auto& item : a) EXPECT_TRUE(torch::allclose(item.value(), b[item.key()], 1e-6, 1e-7)) << item.key();

  auto c = make();
  lo::LayerwiseOptimizer forced(c, lo::LayerwiseOptions::lars(1.0));
  forced.set_kernel(lo::StepKernel::kFused);
  grads(c);
  try {
    forced.step();
    FAIL() << "a strided gradient was accepted by the fused kernel";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("strided.weight"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("gradient"), std::string::npos) << e.what();
  }
}

TEST(StepKernels, MemoryTrafficCountsOneReadAndOneWrite) {
  lo::NamedParameters p;
  p.insert("w", torch::zeros({10, 10}));  // adapted
  p.insert("b", torch::zeros({10}));      // not adapted (1-D): the same traffic
  lo::LayerwiseOptimizer lars(p, lo::LayerwiseOptions::lars(1.0));
  // w, g, mu read and w, mu written = 5 accesses of 4 bytes
  EXPECT_EQ(lars.step_memory_traffic(), 5 * 110 * 4);
  lo::LayerwiseOptimizer plain(p, lo::LayerwiseOptions::lars(1.0).momentum(0));
  EXPECT_EQ(plain.step_memory_traffic(), 3 * 110 * 4);  // w, g read, w written
  lo::LayerwiseOptimizer lamb(p, lo::LayerwiseOptions::lamb(0.01));
  // w, g, m, v read and w, m, v written = 7
  EXPECT_EQ(lamb.step_memory_traffic(), 7 * 110 * 4);
  lo::NamedParameters d;
  d.insert("w", torch::zeros({10, 10}, torch::kDouble));
  EXPECT_EQ(lo::LayerwiseOptimizer(d, lo::LayerwiseOptions::lars(1.0)).step_memory_traffic(), 5 * 100 * 8);
}

TEST(StepKernels, MixedTypesMissingGradientsAndSharedMemory) {
  // float and double in one optimizer, a parameter without a gradient, and a parameter listed twice (its second
  // entry must not race with the first): kAuto agrees with per-tensor operations.
  auto make = [] {
    torch::manual_seed(3);
    lo::NamedParameters p;
    p.insert("f.weight", torch::randn({40, 50}));
    p.insert("d.weight", torch::randn({30, 20}, torch::kDouble));
    p.insert("nograd.weight", torch::randn({5, 5}));
    return p;
  };
  auto grads = [](lo::NamedParameters& p, int t) {
    torch::manual_seed(100 + t);
    p["f.weight"].mutable_grad() = torch::randn({40, 50});
    p["d.weight"].mutable_grad() = torch::randn({30, 20}, torch::kDouble);
  };
  auto run = [&](lo::StepKernel kernel) {
    auto p = make();
    std::vector<torch::Tensor> list = p.values();
    list.push_back(p["f.weight"]);  // the same tensor twice
    lo::LayerwiseOptimizer opt(list, lo::LayerwiseOptions::lars(1.0));
    opt.set_kernel(kernel);
    for (int t = 0; t < 3; ++t) {
      grads(p, t);
      opt.step();
    }
    return p;
  };
  const auto fused = run(lo::StepKernel::kAuto), ops = run(lo::StepKernel::kTensorOps);
  for (const auto& item : fused)
    EXPECT_TRUE(torch::allclose(item.value(), ops[item.key()], 1e-5, 1e-7)) << item.key();
  EXPECT_TRUE(torch::equal(fused["nograd.weight"], make()["nograd.weight"]));
}

TEST(StepKernels, DenormalWeightsAndGradientsGiveFiniteUpdates) {
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    for (const auto& o : {lo::LayerwiseOptions::lars(1.0), lo::LayerwiseOptions::lamb(0.01)}) {
      lo::NamedParameters p;
      p.insert("w", torch::full({16, 16}, 1e-40f));  // float denormals
      lo::LayerwiseOptimizer opt(p, o);
      opt.set_kernel(kernel);
      opt.set_telemetry(true);
      for (int t = 0; t < 3; ++t) {
        p["w"].mutable_grad() = torch::full({16, 16}, t % 2 ? -3e-41f : 2e-41f);
        opt.step();
        EXPECT_TRUE(torch::isfinite(p["w"]).all().item<bool>());
        const double r = opt.last_telemetry().layers.at(0).trust_ratio;
        EXPECT_TRUE(std::isfinite(r) && r > 0) << r;
      }
    }
  }
}

TEST(StepKernels, NonFiniteGradientsStayVisibleInTheWeights) {
  // The optimizer does not hide a NaN (the trainer's --on-nonfinite decides): it reaches the weights on both
  // kernels, and the ratio falls back to 1 rather than propagating NaN into other tensors.
  for (const auto kernel : {lo::StepKernel::kFused, lo::StepKernel::kTensorOps}) {
    lo::NamedParameters p;
    p.insert("a", torch::ones({4, 4}));
    p.insert("b", torch::ones({4, 4}));
    lo::LayerwiseOptimizer opt(p, lo::LayerwiseOptions::lars(1.0));
    opt.set_kernel(kernel);
    p["a"].mutable_grad() = torch::ones({4, 4});
    p["a"].mutable_grad()[0][0] = std::numeric_limits<float>::quiet_NaN();
    p["b"].mutable_grad() = torch::full({4, 4}, std::numeric_limits<float>::infinity());
    opt.step();
    EXPECT_TRUE(torch::isnan(p["a"]).any().item<bool>());
    EXPECT_FALSE(torch::isfinite(p["b"]).all().item<bool>());
  }
}

// ------------------------------------------------------------------ runtime

TEST(Runtime, OpenBlasAndTcmallocAreInUse) {
  EXPECT_NE(largebatch::loaded_blas().find("openblas"), std::string::npos) << largebatch::loaded_blas();
#ifdef LARGEBATCH_TCMALLOC_LINKED  // not in sanitizer builds: the sanitizers bring their own allocator
  EXPECT_TRUE(largebatch::tcmalloc_loaded());
#else
  EXPECT_FALSE(largebatch::tcmalloc_loaded());
#endif
}

}  // namespace
