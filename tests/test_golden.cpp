// Golden parity: every *.json case in $GOLDEN_DIR, default tests/golden, run in float32 and compared step by step
// with |a - e| <= 1e-6 + 1e-4 |e|. Format lbt-golden-1 (docs/algorithms.md): our presets, options spelled out;
// lbt-golden-2 (docs/optimizers.md): the peers' own code, built through the factory from `preset` and `hyper`. $GOLDEN_CASE names one file instead:
// CTest runs each case as its own test that way (tests/golden_cases.cmake, evaluated whenever ctest starts).
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>
#include <tuple>

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;

namespace {

constexpr double kAbsTol = 1e-6;
constexpr double kRelTol = 1e-4;

// The repository's reference trajectories, verified against tests/golden/SHA256SUMS by the golden.checksums test.
fs::path golden_dir() {
  if (const char* env = std::getenv("GOLDEN_DIR"); env && *env) return env;
  return fs::path(LARGEBATCH_SOURCE_DIR) / "tests" / "golden";
}

const char* golden_case() {
  const char* env = std::getenv("GOLDEN_CASE");
  return env && *env ? env : nullptr;
}

std::vector<std::string> golden_files() {
  if (const char* one = golden_case()) return fs::is_regular_file(one) ? std::vector<std::string>{one} : std::vector<std::string>{};
  std::vector<std::string> files;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(golden_dir(), ec))
    if (entry.path().extension() == ".json") files.push_back(entry.path().string());
  std::sort(files.begin(), files.end());
  return files;
}

lo::ParamMask mask_from(bool exclude_1d) { return exclude_1d ? lo::ParamMask::exclude_1d() : lo::ParamMask::all(); }

// The options of a golden case, written with the public API only.
lo::LayerwiseOptions options_from(const json& c) {
  const json& o = c.at("options");
  const std::string kind = c.at("optimizer");
  lo::LayerwiseOptions opt(0.0);
  if (kind == "lars") {
    opt = lo::LayerwiseOptions::lars(0.0)
              .momentum(o.at("momentum"))
              .weight_decay(o.at("weight_decay"))
              .eta(o.at("eta"));
    if (o.contains("norm_clamp")) {
      lo::Range r{o["norm_clamp"][0], o["norm_clamp"][1]};
      opt.weight_norm_clamp(r).update_norm_clamp(r);
    }
    if (o.contains("tv")) {
      const json& tv = o["tv"];
      opt.time_varying(lo::TimeVarying{tv.at("alpha"), tv.at("lambda"), tv.at("delay"), tv.at("gamma_min")});
    }
  } else if (kind == "lamb") {
    opt = lo::LayerwiseOptions::lamb(0.0)
              .beta1(o.at("betas")[0])
              .beta2(o.at("betas")[1])
              .eps(o.at("eps"))
              .weight_decay(o.at("weight_decay"))
              .bias_correction(o.at("bias_correction"));
    if (o.contains("norm_clamp")) opt.weight_norm_clamp(lo::Range{o["norm_clamp"][0], o["norm_clamp"][1]});
  } else {
    throw std::runtime_error("unknown optimizer '" + kind + "' in golden case");
  }
  opt.decay_mask(mask_from(o.at("exclude_1d_from_decay")));
  opt.adapt_mask(mask_from(o.at("exclude_1d_from_adaptation")));
  return opt;
}

// A hyper-parameter of lbt-golden-2 as the factory's key=value text (the vocabulary is the factory's: a key it
// does not know fails the case).
std::string override_text(const std::string& key, const json& value) {
  if (value.is_null()) return "none";
  if (value.is_boolean()) return value.get<bool>() ? "true" : "false";
  if (value.is_number()) {
    std::ostringstream os;
    os.precision(17);
    os << value.get<double>();
    return os.str();
  }
  if (value.is_array() && value.size() == 2 && value[0].is_number() && value[1].is_number())
    return override_text(key, value[0]) + ":" + override_text(key, value[1]);
  throw std::runtime_error("hyper-parameter " + key + " = " + value.dump() + " is neither a number, a boolean, null nor a pair");
}

// The optimizer of a case: lbt-golden-1 from its options; lbt-golden-2 through the factory, as a user names it.
std::unique_ptr<lo::LayerwiseOptimizer> optimizer_from(const json& c, const lo::NamedParameters& params) {
  const std::string format = c.at("format");
  if (format == "lbt-golden-1") return std::make_unique<lo::LayerwiseOptimizer>(params, options_from(c));
  if (format != "lbt-golden-2") throw std::runtime_error("unknown golden format '" + format + "'");
  lo::OptimizerSpec spec;
  spec.name = c.at("preset");
  spec.lr = c.at("lr")[0];
  for (const auto& [key, value] : c.at("hyper").items()) spec.overrides[key] = override_text(key, value);
  std::unique_ptr<torch::optim::Optimizer> built = lo::make_optimizer(spec, params);
  auto* layerwise = dynamic_cast<lo::LayerwiseOptimizer*>(built.get());
  if (!layerwise) throw std::runtime_error("preset " + spec.name + " is not a layer-wise optimizer");
  built.release();
  return std::unique_ptr<lo::LayerwiseOptimizer>(layerwise);
}

torch::Tensor tensor_from(const json& values, const json& shape) {
  std::vector<double> data = values.get<std::vector<double>>();
  std::vector<int64_t> dims = shape.get<std::vector<int64_t>>();
  return torch::tensor(data, torch::kDouble).reshape(dims).to(torch::kFloat);
}

bool close(double actual, double expected) {
  return std::isfinite(actual) && std::abs(actual - expected) <= kAbsTol + kRelTol * std::abs(expected);
}

// Every case runs under both step kernels: the fused CPU kernel and per-tensor LibTorch operations.
using GoldenParam = std::tuple<std::string, lo::StepKernel>;
class GoldenCase : public ::testing::TestWithParam<GoldenParam> {
 protected:
  const std::string& file() const { return std::get<0>(GetParam()); }
  lo::StepKernel kernel() const { return std::get<1>(GetParam()); }
};

TEST_P(GoldenCase, MatchesEveryStep) {
  std::ifstream in(file());
  ASSERT_TRUE(in) << "cannot read " << file();
  const json c = json::parse(in);
  const bool peer = c.at("format") == "lbt-golden-2";

  std::vector<std::string> names;
  torch::OrderedDict<std::string, torch::Tensor> params;
  for (const auto& p : c.at("params")) {
    names.push_back(p.at("name"));
    params.insert(p.at("name"), tensor_from(p.contains("value") ? p.at("value") : p.at("values"), p.at("shape")));
  }
  std::unique_ptr<lo::LayerwiseOptimizer> built;
  try {
    built = optimizer_from(c, params);
  } catch (const std::exception& e) {
    FAIL() << file() << ": " << e.what();
  }
  lo::LayerwiseOptimizer& opt = *built;
  opt.set_kernel(kernel());  // kFused: an error if any tensor would fall back to the other path
  opt.set_telemetry(true);

  const size_t steps = c.at("grads").size();
  ASSERT_GT(steps, 0u);
  const bool has_phi = c.contains("phi") && c["phi"].is_array();
  size_t checked = 0;
  double worst = 0;  // largest |a - e| / (abs_tol + rel_tol |e|) seen: how much of the bound is used
  auto track = [&](double a, double e) {
    worst = std::max(worst, std::abs(a - e) / (kAbsTol + kRelTol * std::abs(e)));
  };
  for (size_t t = 0; t < steps; ++t) {
    lo::set_learning_rate(opt, c.at("lr")[t].get<double>());
    for (size_t i = 0; i < names.size(); ++i) {
      const auto& p = params[names[i]];
      p.mutable_grad() = tensor_from(c["grads"][t][i], c["params"][i]["shape"]);
    }
    opt.step();

    const lo::StepTelemetry& tel = opt.last_telemetry();
    ASSERT_EQ(tel.step, static_cast<int64_t>(t));
    if (has_phi) {
      const double expected_phi = c["phi"][t];
      ASSERT_TRUE(close(tel.phi, expected_phi)) << "phi at step " << t << ": " << tel.phi << " vs " << expected_phi;
    }
    for (size_t i = 0; i < names.size(); ++i) {
      const auto actual = params[names[i]].to(torch::kDouble).flatten();
      const std::vector<double> expected = c["expected"][t][i].get<std::vector<double>>();
      ASSERT_EQ(actual.numel(), static_cast<int64_t>(expected.size())) << names[i];
      auto acc = actual.accessor<double, 1>();
      for (size_t k = 0; k < expected.size(); ++k) {
        track(acc[k], expected[k]);
        ASSERT_TRUE(close(acc[k], expected[k])) << file() << ": step " << t << ", " << names[i] << "[" << k
                                                << "] = " << acc[k] << ", expected " << expected[k];
        ++checked;
      }
      if (peer) continue;  // the peers expose no ratio: their parameters are checked at every step
      // Trust ratio: null exactly where the tensor is not adapted.
      const json& r = c["trust_ratio"][t][i];
      auto found = std::find_if(tel.layers.begin(), tel.layers.end(),
                                [&](const lo::LayerTelemetry& l) { return l.name == names[i]; });
      if (r.is_null()) {
        EXPECT_EQ(found, tel.layers.end()) << names[i] << " is adapted but the golden file says it is not";
      } else {
        ASSERT_NE(found, tel.layers.end()) << names[i] << " has no trust ratio at step " << t;
        track(found->trust_ratio, r.get<double>());
        ASSERT_TRUE(close(found->trust_ratio, r.get<double>()))
            << file() << ": trust ratio of " << names[i] << " at step " << t << " = " << found->trust_ratio
            << ", expected " << r.get<double>();
        EXPECT_DOUBLE_EQ(found->effective_lr, c["lr"][t].get<double>() * found->trust_ratio);
        ++checked;
      }
    }
  }
  EXPECT_EQ(opt.steps_taken(), static_cast<int64_t>(steps));
  std::cout << "[ golden   ] " << fs::path(file()).filename().string() << ": " << steps << " steps, " << checked
            << " values, worst error " << worst << " of the bound\n";
  RecordProperty("worst_fraction_of_bound", std::to_string(worst));
  EXPECT_GT(checked, steps * names.size());
}

// The schedule of the case reproduces its lr column.
TEST_P(GoldenCase, ScheduleReproducesLearningRates) {
  std::ifstream in(file());
  const json c = json::parse(in);
  const json& s = c.at("lr_schedule");
  const int64_t steps = c.at("steps");
  lo::ScheduleOptions so;
  so.total_steps = steps;
  const std::string kind = s.at("kind");
  if (kind == "constant") {
    so.kind = lo::ScheduleKind::kConstant;
    so.lr = s.at("value");
  } else if (kind == "warmup_cosine") {
    so.kind = lo::ScheduleKind::kWarmupCosine;
    so.lr = s.at("peak");
    so.warmup_steps = s.at("warmup");
    so.final_ratio = s.at("final_ratio");
    if (s.contains("steps")) so.total_steps = s["steps"];
  } else {
    FAIL() << file() << ": lr_schedule kind '" << kind << "' is not one of lbt-golden-1's (constant, warmup_cosine)";
  }
  const lo::LrSchedule schedule(so);
  for (int64_t t = 0; t < steps; ++t) {
    const double expected = c["lr"][t];
    EXPECT_TRUE(close(schedule.at(t), expected)) << "lr at step " << t << ": " << schedule.at(t) << " vs " << expected;
  }
  if (c.contains("phi") && c["phi"].is_array() && c.contains("options") && c["options"].contains("tv")) {
    const json& tv = c["options"]["tv"];
    const lo::TimeVarying f{tv["alpha"], tv["lambda"], tv["delay"], tv["gamma_min"]};
    for (int64_t t = 0; t < steps; ++t) EXPECT_NEAR(lo::tv_phi(f, t), c["phi"][t].get<double>(), 1e-12);
  }
}

std::string case_name(const ::testing::TestParamInfo<GoldenParam>& info) {
  std::string stem = fs::path(std::get<0>(info.param)).stem().string();
  for (auto& ch : stem)
    if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
  return stem + (std::get<1>(info.param) == lo::StepKernel::kFused ? "_fused" : "_tensor_ops");
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenCase,
                         ::testing::Combine(::testing::ValuesIn(golden_files()),
                                            ::testing::Values(lo::StepKernel::kFused, lo::StepKernel::kTensorOps)),
                         case_name);
GTEST_ALLOW_UNINSTANTIATED_PARAMETERIZED_TEST(GoldenCase);

// The directory must hold cases, and a named case must exist: an empty selection is a failure, not a silent pass.
TEST(GoldenDirectory, HasCases) {
  if (const char* one = golden_case()) {
    EXPECT_FALSE(golden_files().empty()) << "GOLDEN_CASE " << one << " is not a file";
  } else {
    EXPECT_FALSE(golden_files().empty()) << "no *.json golden cases in " << golden_dir();
  }
}

}  // namespace
