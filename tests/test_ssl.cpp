// Barlow Twins pre-training and linear evaluation, end to end on small synthetic data.
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "scratch.h"
#include "small_runs.h"

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

namespace fs = std::filesystem;
namespace lm = largebatch::models;
namespace lt = largebatch::train;
namespace lo = largebatch::optim;

namespace {

using largebatch_test::ScratchDir;
using largebatch_test::small_linear_eval;
using largebatch_test::small_pretrain;

torch::OrderedDict<std::string, torch::Tensor> load_tensors(const fs::path& path, lm::Classifier model) {
  torch::serialize::InputArchive archive;
  archive.load_from(path.string());
  model->load(archive);
  auto all = model->named_parameters();
  for (const auto& b : model->named_buffers()) all.insert(b.key(), b.value());
  return all;
}

lm::Classifier cnn() {
  lm::ModelOptions o;
  o.name = "cnn";
  return lm::make_model(o);
}

std::string read(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

TEST(Pretrain, LowersTheLossAndWritesEveryOutput) {
  ScratchDir dir("pretrain");
  auto c = small_pretrain(dir.path);
  c.telemetry_every = 1;
  c.plots = true;
  const auto s = lt::run_pretraining(c);
  ASSERT_EQ(s.status, "completed") << s.message;
  ASSERT_EQ(s.history.size(), 3u);
  EXPECT_EQ(s.steps, 12);
  EXPECT_LT(s.history.back().train_loss, 0.9 * s.history.front().train_loss);
  // The loss is its two terms: on-diagonal + lambda * off-diagonal (means over the same steps).
  for (const auto& r : s.history)
    EXPECT_NEAR(r.train_loss, r.on_diagonal + c.lambda * r.off_diagonal, 1e-6 * r.train_loss);
  for (const char* f : {"config.json", "metrics.csv", "summary.json", "checkpoint.pt", "backbone.pt", "telemetry.csv"})
    EXPECT_TRUE(fs::exists(dir.path / f)) << f;
  if (largebatch::report::gnuplot_available()) {
    EXPECT_GT(fs::file_size(dir.path / "loss.png"), 1000u);
    EXPECT_GT(fs::file_size(dir.path / "trust_ratios.png"), 1000u);
  }
  // Telemetry names the backbone's and the projector's tensors, never the unused classifier head.
  const std::string telemetry = read(dir.path / "telemetry.csv");
  EXPECT_NE(telemetry.find(",backbone.conv1.weight,"), std::string::npos);
  EXPECT_NE(telemetry.find(",projector.linear1.weight,"), std::string::npos);
  EXPECT_EQ(telemetry.find("backbone.fc.weight"), std::string::npos);
  const auto j = nlohmann::json::parse(read(dir.path / "summary.json"));
  EXPECT_EQ(j["status"], "completed");
  EXPECT_EQ(j["steps"], 12);
  // config.json is the configuration with the learning rate the run used (LAMB's recipe: 0.01).
  auto used = c;
  used.lr = 0.01;
  EXPECT_EQ(lt::PretrainConfig::from_json(read(dir.path / "config.json"), "config.json").to_json(), used.to_json());
  // backbone.pt is a zoo classifier file: it loads into the model it names.
  EXPECT_NO_THROW(load_tensors(dir.path / "backbone.pt", cnn()));
}

// A resumed pre-training ended as the uninterrupted one: the step counter (it drives the schedule, phi_t and
// telemetry), each epoch's loss terms, and the backbone's tensors.
void expect_same_pretraining(const lt::PretrainSummary& straight, const lt::PretrainSummary& resumed,
                             const fs::path& straight_dir, const fs::path& resumed_dir) {
  ASSERT_EQ(resumed.status, "completed");
  ASSERT_EQ(resumed.history.size(), straight.history.size());
  for (size_t i = 0; i < straight.history.size(); ++i) {
    EXPECT_EQ(resumed.history[i].step, straight.history[i].step) << i;
    EXPECT_EQ(resumed.history[i].train_loss, straight.history[i].train_loss) << i;
    EXPECT_EQ(resumed.history[i].off_diagonal, straight.history[i].off_diagonal) << i;
  }
  const auto ta = load_tensors(straight_dir / "backbone.pt", cnn()), tb = load_tensors(resumed_dir / "backbone.pt", cnn());
  for (const auto& item : ta) EXPECT_TRUE(torch::equal(item.value(), tb[item.key()])) << item.key();
}

TEST(Pretrain, ResumeEqualsAnUninterruptedRun) {
  ScratchDir straight("straight"), split("split");
  auto a = small_pretrain(straight.path);
  const auto sa = lt::run_pretraining(a);
  ASSERT_EQ(sa.status, "completed");
  auto b = small_pretrain(split.path);
  b.epochs = 1;
  ASSERT_EQ(lt::run_pretraining(b).status, "completed");
  b.epochs = 3;
  b.resume = true;
  expect_same_pretraining(sa, lt::run_pretraining(b), straight.path, split.path);
  // metrics.csv has one row per epoch after the resume.
  const std::string metrics = read(split.path / "metrics.csv");
  EXPECT_EQ(std::count(metrics.begin(), metrics.end(), '\n'), 4);
}

// --checkpoint-every within epochs: a run that dies after such a checkpoint resumes in the middle of the epoch
// and ends exactly as an uninterrupted run (weights, and each epoch's loss sums carried in the checkpoint).
TEST(Pretrain, ResumeWithinAnEpochEqualsAnUninterruptedRun) {
  ScratchDir straight("straight-within"), crashed("crashed-within");
  auto a = small_pretrain(straight.path);  // 3 epochs of 4 steps
  const auto sa = lt::run_pretraining(a);
  ASSERT_EQ(sa.status, "completed");
  auto b = small_pretrain(crashed.path);
  b.checkpoint_every = 3;
  b.crash_after_step = 6;  // the last checkpoint is the one after step 6: epoch 2, batch 2
  EXPECT_THROW(lt::run_pretraining(b), lt::SimulatedCrash);
  b.crash_after_step = -1;
  b.resume = true;
  expect_same_pretraining(sa, lt::run_pretraining(b), straight.path, crashed.path);
}

TEST(Pretrain, WarmupSpansThisRunsOwnLength) {
  // The reference code sized its warm-up by a different epoch count than it trained for; here W and T are
  // this run's own steps: 2 epochs of 4 steps, 1 warm-up epoch -> W = 4, T = 8.
  ScratchDir dir("warmup");
  auto c = small_pretrain(dir.path);
  c.epochs = 2;
  c.optimizer = "wa-lamb";
  c.warmup_epochs = 1;
  c.lr = 0.02;
  const auto s = lt::run_pretraining(c);
  ASSERT_EQ(s.history.size(), 2u);
  lo::ScheduleOptions so;
  so.kind = lo::ScheduleKind::kWarmupCosine;
  so.lr = 0.02;
  so.warmup_steps = 4;
  so.total_steps = 8;
  const lo::LrSchedule expected(so);
  EXPECT_DOUBLE_EQ(s.history[0].lr, expected.at(3));  // 0.02 * 3/4: still warming up at the end of epoch 1
  EXPECT_DOUBLE_EQ(s.history[1].lr, expected.at(7));  // on the cosine, near its end
  EXPECT_NEAR(s.history[0].lr, 0.015, 1e-12);
}

TEST(Pretrain, DataParallelViewsOfAShardAreTheSingleProcessRows) {
  // A rank's shard of a batch must see exactly the views the single process gives those rows.
  const auto images = torch::rand({6, 1, 28, 28});
  for (int view : {0, 1}) {
    const auto whole = lt::barlow_twins_view(images, view, 42, 6, 0);
    const auto shard = lt::barlow_twins_view(images.narrow(0, 3, 3), view, 42, 6, 3);
    EXPECT_TRUE(torch::equal(whole.narrow(0, 3, 3), shard));
  }
}

TEST(LinearEval, PretrainedBackboneIsFrozenAndResumeIsExact) {
  ScratchDir pre("le_pre"), straight("le_straight"), split("le_split");
  auto p = small_pretrain(pre.path);
  p.epochs = 1;
  ASSERT_EQ(lt::run_pretraining(p).status, "completed");
  const auto backbone = (pre.path / "backbone.pt").string();
  const auto before = load_tensors(backbone, cnn());

  auto a = small_linear_eval(straight.path, backbone);
  a.plots = true;
  const auto s = lt::run_linear_eval(a);
  ASSERT_EQ(s.status, "completed") << s.message;
  ASSERT_EQ(s.history.size(), 3u);
  EXPECT_GT(s.final_test_top1, 0.5);  // 10 learnable classes: chance is 0.1
  EXPECT_GE(s.history.back().test_top5, s.history.back().test_top1);
  EXPECT_NEAR(s.history[0].lr, 0.3, 1e-12);           // cosine stepped per epoch: lr, then lower
  EXPECT_NEAR(s.history[1].lr, 0.3 * 0.75, 1e-12);    // 0.3 (1 + cos(pi / 3)) / 2
  for (const char* f : {"config.json", "metrics.csv", "summary.json", "checkpoint.pt", "head.pt"})
    EXPECT_TRUE(fs::exists(straight.path / f)) << f;
  const auto j = nlohmann::json::parse(read(straight.path / "summary.json"));
  EXPECT_EQ(j["model"], "cnn");  // read from the backbone run's config.json
  EXPECT_DOUBLE_EQ(j["final_test_top1"].get<double>(), s.final_test_top1);
  // The backbone file is untouched.
  const auto after = load_tensors(backbone, cnn());
  for (const auto& item : before) EXPECT_TRUE(torch::equal(item.value(), after[item.key()])) << item.key();

  // 1 epoch, then resumed to 3: epoch 1's lr is the same for any length, later epochs follow the 3-epoch cosine.
  auto b = small_linear_eval(split.path, backbone);
  b.epochs = 1;
  lt::run_linear_eval(b);
  b.epochs = 3;
  b.resume = true;
  const auto r = lt::run_linear_eval(b);
  ASSERT_EQ(r.history.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(r.history[i].test_top1, s.history[i].test_top1) << i;
  torch::serialize::InputArchive ha, hb;
  ha.load_from((straight.path / "head.pt").string());
  hb.load_from((split.path / "head.pt").string());
  for (const char* key : {"feature_mean", "feature_std"}) {
    torch::Tensor x, y;
    ASSERT_TRUE(ha.try_read(key, x, /*is_buffer=*/true));
    ASSERT_TRUE(hb.try_read(key, y, /*is_buffer=*/true));
    EXPECT_TRUE(torch::equal(x, y)) << key;
  }
  torch::serialize::InputArchive la, lb;
  ASSERT_TRUE(ha.try_read("linear", la));
  ASSERT_TRUE(hb.try_read("linear", lb));
  for (const char* key : {"weight", "bias"}) {
    torch::Tensor x, y;
    ASSERT_TRUE(la.try_read(key, x));
    ASSERT_TRUE(lb.try_read(key, y));
    EXPECT_TRUE(torch::equal(x, y)) << key;
  }
}

TEST(LinearEval, RandomBackboneAndStandardisation) {
  ScratchDir with("le_std"), without("le_raw");
  auto a = small_linear_eval(with.path, "random");
  a.model = "cnn";
  const auto s = lt::run_linear_eval(a);
  ASSERT_EQ(s.status, "completed");
  auto b = small_linear_eval(without.path, "random");
  b.model = "cnn";
  b.standardize = false;
  const auto t = lt::run_linear_eval(b);
  ASSERT_EQ(t.status, "completed");
  // Same backbone and seed; only the standardisation differs, and it must change the result.
  EXPECT_NE(s.history.back().test_loss, t.history.back().test_loss);
  torch::serialize::InputArchive archive;
  archive.load_from((without.path / "head.pt").string());
  torch::Tensor stdev;
  ASSERT_TRUE(archive.try_read("feature_std", stdev, true));
  EXPECT_TRUE(torch::equal(stdev, torch::ones_like(stdev)));  // --no-standardize leaves the features as they are
}

TEST(SelfSupervisedConfig, BadInputNamesTheFlagOrKey) {
  auto expect_usage = [](auto&& f, const std::string& needle) {
    try {
      f();
      ADD_FAILURE() << "no error; expected one naming " << needle;
    } catch (const lt::UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_usage([] { lt::PretrainConfig::from_json(R"({"projecter": "1-2"})", "cfg.json"); }, "unknown key 'projecter'");
  expect_usage([] { lt::PretrainConfig::from_json(R"({"epochs": 2.5})", "cfg.json"); }, "'epochs' must be an integer");
  expect_usage([] { lt::LinearEvalConfig::from_json(R"([1])", "le.json"); }, "le.json: expected a JSON object");
  expect_usage([] {
    lt::PretrainConfig c;
    c.projector = "128-0";
    c.validate();
  }, "projector: '128-0'");
  expect_usage([] {
    lt::LinearEvalConfig c;
    c.backbone = "random";
    c.model = "cnn";
    c.momentum = 1.0;
    c.validate();
  }, "momentum must be in [0, 1)");
}
