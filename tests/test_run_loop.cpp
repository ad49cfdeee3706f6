// The one training loop (src/train/run_loop.cpp) through its three tasks: each loop feature where it means
// something for the task (resume within an epoch, the non-finite policy, micro-batches, the validation split),
// the reporter the library prints through, and the option lists that configs, JSON and flags share.
#include <largebatch/largebatch.h>
#include <largebatch/train/options.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "scratch.h"
#include "small_runs.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

namespace fs = std::filesystem;
namespace lt = largebatch::train;

namespace {

using largebatch_test::ScratchDir;

// mlp backbone (no BatchNorm: a skipped step leaves it exactly as it was), 2 epochs.
lt::PretrainConfig small_pretrain(const fs::path& out) {
  auto c = largebatch_test::small_pretrain(out);
  c.model = "mlp";
  c.epochs = 2;
  return c;
}

// A random compact-CNN backbone.
lt::LinearEvalConfig small_probe(const fs::path& out) {
  auto c = largebatch_test::small_linear_eval(out, "random");
  c.model = "cnn";
  return c;
}

// mlp with LARS, 2 epochs.
lt::TrainConfig small_train(const fs::path& out) {
  auto c = largebatch_test::small_run(out);
  c.model = "mlp";
  c.optimizer = "lars";
  c.epochs = 2;
  return c;
}

// Every tensor of a bare LibTorch archive (model.pt, backbone.pt, head.pt) by its dotted name, submodules too.
void collect_tensors(torch::serialize::InputArchive& archive, const std::string& prefix,
                     std::map<std::string, torch::Tensor>& out) {
  for (const auto& key : archive.keys()) {
    torch::Tensor t;
    torch::serialize::InputArchive part;
    if (archive.try_read(key, t, true)) out[prefix + key] = t;
    else if (archive.try_read(key, part)) collect_tensors(part, prefix + key + ".", out);
  }
}

std::map<std::string, torch::Tensor> tensors_of(const fs::path& file) {
  torch::serialize::InputArchive archive;
  archive.load_from(file.string());
  std::map<std::string, torch::Tensor> out;
  collect_tensors(archive, "", out);
  return out;
}

void expect_same_tensors(const fs::path& a, const fs::path& b) {
  const auto ta = tensors_of(a), tb = tensors_of(b);
  ASSERT_FALSE(ta.empty()) << a;
  ASSERT_EQ(ta.size(), tb.size());
  for (const auto& [key, t] : ta) {
    ASSERT_TRUE(tb.count(key)) << key;
    EXPECT_TRUE(torch::equal(t, tb.at(key))) << key << " differs between " << a << " and " << b;
  }
}

// Whether two archives of the same model differ in any tensor.
bool some_tensor_differs(const fs::path& a, const fs::path& b) {
  const auto ta = tensors_of(a), tb = tensors_of(b);
  for (const auto& [key, t] : ta)
    if (!tb.count(key) || !torch::equal(t, tb.at(key))) return true;
  return false;
}

std::string read(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// metrics.csv without its timing columns (the last ones of a row differ from run to run).
std::vector<std::string> metric_rows(const fs::path& csv, size_t columns) {
  std::vector<std::string> rows;
  std::istringstream in(read(csv));
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    std::string field, kept;
    for (size_t i = 0; i < columns && std::getline(fields, field, ','); ++i) kept += field + ",";
    rows.push_back(kept);
  }
  return rows;
}

struct RecordingReporter : lt::Reporter {
  std::vector<std::string> infos, warnings, epochs;
  int64_t steps = 0;
  void info(const std::string& line) override { infos.push_back(line); }
  void warning(const std::string& line) override { warnings.push_back(line); }
  void step(int64_t, int64_t, int64_t, int64_t, const std::string&) override { ++steps; }
  void epoch(const std::string& line) override { epochs.push_back(line); }
};

}  // namespace

// Linear-eval, both on precomputed features and on augmented images through the backbone: killed within an
// epoch and resumed, it ends with the head and metrics of an uninterrupted run (train and pretrain: the
// Trainer.* and Pretrain.* resume tests).
TEST(RunLoop, LinearEvalResumedWithinAnEpochIsBitIdentical) {
  for (const std::string augment : {"none", "flip"}) {
    SCOPED_TRACE("augment " + augment);
    ScratchDir straight("probe-straight"), crashed("probe-crashed");
    auto a = small_probe(straight.path);
    a.augment = augment;
    const auto sa = lt::run_linear_eval(a);
    ASSERT_EQ(sa.status, "completed") << sa.message;
    auto b = a;
    b.out = crashed.path.string();
    b.checkpoint_every = 3;
    b.crash_after_step = 6;  // the last checkpoint is the one after step 6: epoch 2, batch 2
    EXPECT_THROW(lt::run_linear_eval(b), lt::SimulatedCrash);
    b.crash_after_step = -1;
    b.resume = true;
    const auto sb = lt::run_linear_eval(b);
    ASSERT_EQ(sb.status, "completed") << sb.message;
    EXPECT_EQ(sb.steps, 12);
    expect_same_tensors(straight.path / "head.pt", crashed.path / "head.pt");
    ASSERT_EQ(sa.history.size(), sb.history.size());
    for (size_t i = 0; i < sa.history.size(); ++i) {
      EXPECT_EQ(sa.history[i].train_loss, sb.history[i].train_loss) << "epoch " << i + 1;
      EXPECT_EQ(sa.history[i].test_top1, sb.history[i].test_top1) << "epoch " << i + 1;
      EXPECT_EQ(sa.history[i].lr, sb.history[i].lr) << "epoch " << i + 1;
    }
    EXPECT_EQ(metric_rows(straight.path / "metrics.csv", 9), metric_rows(crashed.path / "metrics.csv", 9));
  }
}

// --on-nonfinite skip drops a step without touching weights or optimizer state, in every task: skipping every
// step of epoch 2 leaves exactly the weights of a run that stopped after epoch 1.
TEST(RunLoop, EveryTaskSkipsANonFiniteStepWithoutChangingAnything) {
  {
    ScratchDir one("skip-pre-one"), two("skip-pre-two");
    auto a = small_pretrain(one.path);
    a.epochs = 1;
    a.schedule = "constant";
    ASSERT_EQ(lt::run_pretraining(a).status, "completed");
    auto b = a;
    b.out = two.path.string();
    b.epochs = 2;
    b.on_nonfinite = "skip";
    b.inject_nonfinite_gradient_at = {4, 5, 6, 7};
    const auto s = lt::run_pretraining(b);
    EXPECT_EQ(s.status, "completed") << s.message;
    EXPECT_EQ(s.skipped_steps, 4);
    EXPECT_EQ(s.steps, 8);
    expect_same_tensors(one.path / "backbone.pt", two.path / "backbone.pt");
    EXPECT_EQ(nlohmann::json::parse(read(two.path / "summary.json")).at("skipped_steps"), 4);
    // Stop (the default) ends the run as diverged and names the layer.
    ScratchDir stopped("skip-pre-stop");
    auto c = b;
    c.out = stopped.path.string();
    c.on_nonfinite = "stop";
    const auto t = lt::run_pretraining(c);
    EXPECT_EQ(t.status, "diverged");
    EXPECT_NE(t.message.find("non-finite gradient in backbone."), std::string::npos) << t.message;
    EXPECT_NE(t.message.find("at step 4 (epoch 2)"), std::string::npos) << t.message;
  }
  {
    ScratchDir one("skip-probe-one"), two("skip-probe-two");
    auto a = small_probe(one.path);
    a.epochs = 1;
    ASSERT_EQ(lt::run_linear_eval(a).status, "completed");
    auto b = a;
    b.out = two.path.string();
    b.epochs = 2;
    b.on_nonfinite = "skip";
    b.inject_nonfinite_gradient_at = {4, 5, 6, 7};
    const auto s = lt::run_linear_eval(b);
    EXPECT_EQ(s.status, "completed") << s.message;
    EXPECT_EQ(s.skipped_steps, 4);
    expect_same_tensors(one.path / "head.pt", two.path / "head.pt");
    // skip-limit counts steps skipped in a row here too.
    ScratchDir limited("skip-probe-limit");
    auto c = b;
    c.out = limited.path.string();
    c.skip_limit = 3;
    const auto t = lt::run_linear_eval(c);
    EXPECT_EQ(t.status, "diverged");
    EXPECT_NE(t.message.find("3 steps skipped in a row"), std::string::npos) << t.message;
  }
}

// The probe has no BatchNorm: micro-batches give the whole batch's gradient (to float rounding).
nlohmann::json summary_of(const fs::path& out) { return nlohmann::json::parse(read(out / "summary.json")); }

// The CSV's rows as maps from column name to field.
std::vector<std::map<std::string, std::string>> csv_rows(const fs::path& csv) {
  std::istringstream in(read(csv));
  std::string line;
  std::vector<std::string> header;
  std::vector<std::map<std::string, std::string>> rows;
  for (bool first = true; std::getline(in, line); first = false) {
    std::vector<std::string> fields;
    std::istringstream f(line);
    std::string field;
    while (std::getline(f, field, ',')) fields.push_back(field);
    if (!line.empty() && line.back() == ',') fields.push_back("");
    if (first) {
      header = fields;
      continue;
    }
    std::map<std::string, std::string> row;
    for (size_t i = 0; i < header.size() && i < fields.size(); ++i) row[header[i]] = fields[i];
    rows.push_back(row);
  }
  return rows;
}

// --clip-grad-norm clips the gradient the optimizer sees, for the engine and LibTorch's optimizers, in train and
// pretrain: a tiny N clips every step and changes the trajectory; a huge one clips none and leaves it bit-identical
// to a run without clipping; metrics.csv logs the norm per epoch and summary.json counts the clipped steps.
TEST(RunLoop, ClipGradNormClipsTheGradientOfAnyOptimizer) {
  for (const std::string optimizer : {"lars", "sgd"}) {
    SCOPED_TRACE(optimizer);
    ScratchDir plain("clip-plain"), tiny("clip-tiny"), huge("clip-huge");
    auto a = small_train(plain.path);
    a.optimizer = optimizer;
    a.schedule = "constant";
    ASSERT_EQ(lt::run_training(a).status, "completed");
    auto b = a;
    b.out = tiny.path.string();
    b.clip_grad_norm = 1e-4;
    ASSERT_EQ(lt::run_training(b).status, "completed");
    auto c = a;
    c.out = huge.path.string();
    c.clip_grad_norm = 1e9;
    ASSERT_EQ(lt::run_training(c).status, "completed");

    const auto sb = summary_of(tiny.path), sc = summary_of(huge.path);
    EXPECT_EQ(sb.at("clipped_steps").get<int64_t>(), 8);
    EXPECT_EQ(sb.at("clip_grad_norm").get<double>(), 1e-4);
    EXPECT_EQ(sc.at("clipped_steps").get<int64_t>(), 0);
    EXPECT_FALSE(summary_of(plain.path).contains("clipped_steps"));
    const auto rows = csv_rows(tiny.path / "metrics.csv");
    ASSERT_EQ(rows.size(), 2u);
    for (const auto& row : rows) {
      EXPECT_EQ(row.at("clipped_steps"), "4");
      EXPECT_GT(std::stod(row.at("grad_norm")), 1e-4);
      EXPECT_GE(std::stod(row.at("grad_norm_max")), std::stod(row.at("grad_norm")));
    }
    EXPECT_EQ(csv_rows(plain.path / "metrics.csv").front().count("grad_norm"), 0u);
    expect_same_tensors(plain.path / "model.pt", huge.path / "model.pt");
    EXPECT_TRUE(some_tensor_differs(plain.path / "model.pt", tiny.path / "model.pt"))
        << "clipping every step left the weights unchanged";
  }
  // After micro-batch accumulation: the norm is the whole batch's.
  ScratchDir whole("clip-whole"), micro("clip-micro");
  auto w = small_train(whole.path);
  w.clip_grad_norm = 1e-4;
  w.epochs = 1;
  ASSERT_EQ(lt::run_training(w).status, "completed");
  auto m = w;
  m.out = micro.path.string();
  m.micro_batch = 32;
  ASSERT_EQ(lt::run_training(m).status, "completed");
  const double nw = std::stod(csv_rows(whole.path / "metrics.csv").at(0).at("grad_norm"));
  const double nm = std::stod(csv_rows(micro.path / "metrics.csv").at(0).at("grad_norm"));
  EXPECT_NEAR(nm, nw, 1e-4 * nw) << "micro-batches must be clipped after accumulation";
  // Pre-training.
  ScratchDir pre("clip-pre");
  auto p = small_pretrain(pre.path);
  p.clip_grad_norm = 1e-6;
  ASSERT_EQ(lt::run_pretraining(p).status, "completed");
  EXPECT_EQ(summary_of(pre.path).at("clipped_steps").get<int64_t>(), 8);
  EXPECT_EQ(csv_rows(pre.path / "metrics.csv").at(1).at("clipped_steps"), "4");
}

// The average of the weights against its formula over three hand-set steps, BatchNorm buffers included.
TEST(WeightAverage, EqualsItsFormulaAndSwapsBack) {
  torch::nn::Sequential net(torch::nn::Linear(2, 1), torch::nn::BatchNorm1d(1));
  torch::NoGradGuard no_grad;
  auto w = net->named_parameters()["0.weight"];
  auto mean = net->named_buffers()["1.running_mean"];
  auto count = net->named_buffers()["1.num_batches_tracked"];
  w.copy_(torch::tensor({{1.0f, 2.0f}}));
  mean.fill_(0.0f);
  const double d = 0.9;
  lt::WeightAverage average(*net, d);
  const std::vector<std::vector<float>> steps = {{3, 4}, {5, -2}, {0, 1}};
  for (size_t t = 0; t < steps.size(); ++t) {
    w.copy_(torch::tensor(steps[t]).view({1, 2}));
    mean.fill_(static_cast<float>(t + 1));
    count.fill_(static_cast<int64_t>(t + 1));
    average.update();
  }
  // e3 = d^3 w0 + (1 - d)(d^2 w1 + d w2 + w3)
  const double e0 = d * d * d * 1 + (1 - d) * (d * d * 3 + d * 5 + 0);
  const double e1 = d * d * d * 2 + (1 - d) * (d * d * 4 + d * -2 + 1);
  const double em = (1 - d) * (d * d * 1 + d * 2 + 3);
  const auto names = average.names();
  const auto at = [&](const std::string& name) {
    return average.tensors()[std::find(names.begin(), names.end(), name) - names.begin()];
  };
  EXPECT_NEAR(at("0.weight")[0][0].item<double>(), e0, 1e-6);
  EXPECT_NEAR(at("0.weight")[0][1].item<double>(), e1, 1e-6);
  EXPECT_NEAR(at("1.running_mean")[0].item<double>(), em, 1e-6);
  EXPECT_EQ(at("1.num_batches_tracked").item<int64_t>(), 3) << "integer buffers are copied";
  const auto trained = w.clone();
  average.swap();
  EXPECT_NEAR(w[0][0].item<double>(), e0, 1e-6);
  average.swap();
  EXPECT_TRUE(torch::equal(w, trained));
  EXPECT_THROW(lt::WeightAverage(*net, 1.0), std::invalid_argument);
}

// --ema-decay in a run: evaluated each epoch (metrics.csv's ema_* columns), saved as model_ema.pt, and resumed
// within an epoch bit-identically; the trained weights are those of a run without it.
TEST(RunLoop, WeightAverageIsEvaluatedSavedAndResumedBitIdentically) {
  ScratchDir plain("ema-plain"), straight("ema-straight"), crashed("ema-crashed");
  auto a = largebatch_test::small_run(plain.path);
  a.epochs = 2;
  a.val_split = 64;
  ASSERT_EQ(lt::run_training(a).status, "completed");
  auto b = a;
  b.out = straight.path.string();
  b.ema_decay = 0.9;
  ASSERT_EQ(lt::run_training(b).status, "completed");
  expect_same_tensors(plain.path / "model.pt", straight.path / "model.pt");
  const auto rows = csv_rows(straight.path / "metrics.csv");
  ASSERT_EQ(rows.size(), 2u);
  for (const auto& row : rows) {
    for (const char* key : {"ema_test_loss", "ema_test_top1", "ema_test_top5", "ema_val_top1"})
      EXPECT_FALSE(row.at(key).empty()) << key;
    EXPECT_NE(row.at("ema_test_loss"), row.at("test_loss"));
  }
  const auto summary = summary_of(straight.path);
  EXPECT_EQ(summary.at("ema_decay").get<double>(), 0.9);
  EXPECT_EQ(summary.at("final_ema_test_top1").get<double>(), std::stod(rows.back().at("ema_test_top1")));
  const auto raw = tensors_of(straight.path / "model.pt"), ema = tensors_of(straight.path / "model_ema.pt");
  ASSERT_EQ(raw.size(), ema.size());
  EXPECT_FALSE(torch::equal(raw.begin()->second, ema.at(raw.begin()->first)));

  auto c = b;
  c.out = crashed.path.string();
  c.checkpoint_every = 3;
  c.crash_after_step = 5;
  EXPECT_THROW(lt::run_training(c), lt::SimulatedCrash);
  c.crash_after_step = -1;
  c.resume = true;
  ASSERT_EQ(lt::run_training(c).status, "completed");
  expect_same_tensors(straight.path / "model_ema.pt", crashed.path / "model_ema.pt");
  expect_same_tensors(straight.path / "model.pt", crashed.path / "model.pt");
  EXPECT_EQ(metric_rows(straight.path / "metrics.csv", 9), metric_rows(crashed.path / "metrics.csv", 9));
}

// bf16 with micro-batches and clipping: the master weights stay float32 and the loss falls.
// Every floating tensor of a model file is float32 (what a bf16 run must save).
void expect_float32_tensors(const fs::path& file) {
  const auto saved = tensors_of(file);
  ASSERT_FALSE(saved.empty()) << file;
  for (const auto& [name, t] : saved)
    if (t.is_floating_point()) EXPECT_EQ(t.scalar_type(), torch::kFloat) << name << " is not float32";
}

TEST(RunLoop, Bf16RunKeepsFloat32WeightsAndItsLossFalls) {
  ScratchDir fp32("prec-fp32"), bf16("prec-bf16");
  auto a = largebatch_test::small_run(fp32.path);
  a.optimizer = "lamb";
  const auto sa = lt::run_training(a);
  auto b = a;
  b.out = bf16.path.string();
  b.precision = "bf16";
  b.micro_batch = 64;
  b.clip_grad_norm = 1.0;
  const auto sb = lt::run_training(b);
  ASSERT_EQ(sb.status, "completed") << sb.message;
  EXPECT_LT(sb.history.back().train_loss, sb.history.front().train_loss);
  EXPECT_NE(sb.history.back().train_loss, sa.history.back().train_loss) << "autocast did not change the arithmetic";
  expect_float32_tensors(bf16.path / "model.pt");
}

// Barlow Twins pre-training under bf16 autocast: the loss falls, autocast changes the arithmetic, and the
// backbone stays float32.
TEST(RunLoop, Bf16PretrainingKeepsFloat32WeightsAndItsLossFalls) {
  ScratchDir fp32("prec-bt-fp32"), bf16("prec-bt-bf16");
  auto a = largebatch_test::small_pretrain(fp32.path);  // the compact CNN backbone: convolutions and BatchNorm
  a.optimizer = "lamb";
  const auto sa = lt::run_pretraining(a);
  ASSERT_EQ(sa.status, "completed") << sa.message;
  auto b = a;
  b.out = bf16.path.string();
  b.precision = "bf16";
  const auto sb = lt::run_pretraining(b);
  ASSERT_EQ(sb.status, "completed") << sb.message;
  EXPECT_LT(sb.history.back().train_loss, sb.history.front().train_loss);
  EXPECT_NE(sb.history.back().train_loss, sa.history.back().train_loss) << "autocast did not change the arithmetic";
  expect_float32_tensors(bf16.path / "backbone.pt");
}

// --bn-group-size in a run: it changes the trajectory of a BatchNorm model, equals the whole batch when the group
// is the batch, and is refused for a model without BatchNorm and with --sync-bn.
TEST(RunLoop, GhostBatchNormGroupsChangeTrainingAndAreRefusedWhereMeaningless) {
  ScratchDir plain("ghost-plain"), grouped("ghost-grouped"), whole("ghost-whole");
  auto a = largebatch_test::small_run(plain.path);
  a.epochs = 1;
  a.cpu_kernels = false;  // LibTorch's batch_norm on both sides
  ASSERT_EQ(lt::run_training(a).status, "completed");
  auto b = a;
  b.out = grouped.path.string();
  b.bn_group_size = 32;
  ASSERT_EQ(lt::run_training(b).status, "completed");
  EXPECT_TRUE(some_tensor_differs(plain.path / "model.pt", grouped.path / "model.pt"));
  auto c = a;
  c.out = whole.path.string();
  c.bn_group_size = 128;  // the batch
  ASSERT_EQ(lt::run_training(c).status, "completed");
  expect_same_tensors(plain.path / "model.pt", whole.path / "model.pt");
  ScratchDir mlp("ghost-mlp");
  auto d = small_train(mlp.path);
  d.bn_group_size = 32;
  EXPECT_THROW(lt::run_training(d), lt::OptionError);
  auto e = a;
  e.sync_bn = true;
  e.bn_group_size = 32;
  EXPECT_THROW(lt::run_training(e), lt::OptionError);
}

TEST(RunLoop, LinearEvalMicroBatchesEqualTheWholeBatch) {
  ScratchDir whole("probe-whole"), micro("probe-micro");
  auto a = small_probe(whole.path);
  const auto sa = lt::run_linear_eval(a);
  auto b = a;
  b.out = micro.path.string();
  b.micro_batch = 16;
  const auto sb = lt::run_linear_eval(b);
  ASSERT_EQ(sb.status, "completed") << sb.message;
  const auto ta = tensors_of(whole.path / "head.pt"), tb = tensors_of(micro.path / "head.pt");
  for (const auto& [key, t] : ta) EXPECT_TRUE(torch::allclose(t, tb.at(key), 1e-4, 1e-6)) << key;
  EXPECT_NEAR(sa.history.back().train_loss, sb.history.back().train_loss, 1e-5);
  // Pretrain's loss is a function of the whole batch: the loop has no micro-batches for it (no such option).
  std::set<std::string> keys;
  lt::PretrainConfig p;
  lt::visit_options(p, [&](const lt::Option& o, auto&, auto&&) { keys.insert(o.key()); });
  EXPECT_EQ(keys.count("micro-batch"), 0u);
}

// --val-split in linear-eval: held out of the head's training images, evaluated each epoch, selected on.
TEST(RunLoop, LinearEvalValidationSplit) {
  ScratchDir dir("probe-val");
  auto c = small_probe(dir.path);
  c.val_split = 64;
  const auto s = lt::run_linear_eval(c);
  ASSERT_EQ(s.status, "completed") << s.message;
  EXPECT_EQ(s.steps, 9);  // 192 training images left, 3 steps of 64
  for (const auto& r : s.history) {
    EXPECT_TRUE(std::isfinite(r.val_top1));
    EXPECT_GE(r.val_top1, 0.0);
    EXPECT_LE(r.val_top1, 1.0);
  }
  EXPECT_GE(s.selected_epoch, 1);
  const auto summary = nlohmann::json::parse(read(dir.path / "summary.json"));
  EXPECT_EQ(summary.at("val_split"), 64);
  EXPECT_EQ(summary.at("selected_epoch"), s.selected_epoch);
  const std::string csv = read(dir.path / "metrics.csv");
  EXPECT_NE(csv.find("val_loss,val_top1,val_top5"), std::string::npos);
  EXPECT_EQ(csv.find(",,"), std::string::npos) << csv;  // no empty validation field
}

// The library prints nothing itself: a run without a reporter is silent, one with a reporter hears the banner,
// every step, every epoch and every skipped step.
TEST(RunLoop, TheLibraryReportsOnlyThroughItsReporter) {
  ScratchDir quiet("report-quiet"), heard("report-heard");
  auto c = small_train(quiet.path);
  c.on_nonfinite = "skip";
  c.inject_nonfinite_gradient_at = {1};
  testing::internal::CaptureStdout();
  testing::internal::CaptureStderr();
  const auto s = lt::run_training(c);
  const std::string out = testing::internal::GetCapturedStdout(), err = testing::internal::GetCapturedStderr();
  ASSERT_EQ(s.status, "completed") << s.message;
  EXPECT_EQ(out, "");
  EXPECT_EQ(err, "");

  c.out = heard.path.string();
  RecordingReporter reporter;
  const auto t = lt::run_training(c, &reporter);
  ASSERT_EQ(t.status, "completed") << t.message;
  ASSERT_FALSE(reporter.infos.empty());
  EXPECT_EQ(reporter.infos.front().rfind("largebatch train: synthetic", 0), 0u) << reporter.infos.front();
  EXPECT_EQ(reporter.epochs.size(), 2u);
  EXPECT_EQ(reporter.steps, 7);  // 8 steps, one skipped
  ASSERT_EQ(reporter.warnings.size(), 1u);
  EXPECT_NE(reporter.warnings[0].find("step 1: non-finite gradient in"), std::string::npos) << reporter.warnings[0];
}

// Each command's options come from one list: config.json holds exactly its saved options, reads back to the same
// config, and a bad value is an OptionError naming the option by its key.
template <class Config>
void check_option_list(Config config, const std::string& bad_key, const std::function<void(Config&)>& make_bad) {
  std::set<std::string> saved, all;
  lt::visit_options(config, [&](const lt::Option& o, auto&, auto&&) {
    EXPECT_TRUE(all.insert(o.key()).second) << "option declared twice: " << o.key();
    EXPECT_FALSE(o.help().empty()) << o.key();
    if (o.saved()) saved.insert(o.key());
  });
  const auto written = nlohmann::json::parse(config.to_json());
  std::set<std::string> keys;
  for (auto it = written.begin(); it != written.end(); ++it) keys.insert(it.key());
  EXPECT_EQ(keys, saved);
  EXPECT_EQ(Config::from_json(config.to_json(), "config.json").to_json(), config.to_json());
  make_bad(config);
  try {
    config.validate();
    ADD_FAILURE() << "no error for a bad " << bad_key;
  } catch (const lt::OptionError& e) {
    EXPECT_EQ(e.option(), bad_key) << e.what();
    EXPECT_EQ(std::string(e.what()).rfind(bad_key, 0), 0u) << e.what();
  }
}

// What a resume must keep is marked in the lists: the options that make a run what it is.
template <class Config>
std::set<std::string> identity_options() {
  Config c;
  std::set<std::string> keys;
  lt::visit_options(c, [&](const lt::Option& o, auto&, auto&&) {
    if (o.is_identity()) keys.insert(o.key());
  });
  return keys;
}

TEST(Options, AResumeKeepsTheIdentityOptions) {
  using Keys = std::set<std::string>;
  EXPECT_EQ(identity_options<lt::TrainConfig>(), (Keys{"batch-size", "data", "model", "optimizer", "seed", "val-split"}));
  EXPECT_EQ(identity_options<lt::PretrainConfig>(),
            (Keys{"batch-size", "data", "model", "optimizer", "projector", "seed"}));
  EXPECT_EQ(identity_options<lt::LinearEvalConfig>(), (Keys{"backbone", "batch-size", "data", "seed", "val-split"}));
}

TEST(Options, EachCommandsOptionsComeFromOneList) {
  check_option_list<lt::TrainConfig>({}, "batch-size", [](lt::TrainConfig& c) { c.batch_size = 0; });
  check_option_list<lt::TrainConfig>({}, "on-nonfinite", [](lt::TrainConfig& c) { c.on_nonfinite = "ignore"; });
  check_option_list<lt::PretrainConfig>({}, "lambda", [](lt::PretrainConfig& c) { c.lambda = -1; });
  lt::LinearEvalConfig probe;
  probe.backbone = "random";
  probe.model = "cnn";
  check_option_list<lt::LinearEvalConfig>(probe, "val-split", [](lt::LinearEvalConfig& c) { c.val_split = -1; });
}

// The command line words an error with flags: the option and every option its problem mentions.
TEST(Options, AnErrorNamesEveryOptionItMentions) {
  lt::TrainConfig c;
  c.batch_size = 64;
  c.micro_batch = 48;
  try {
    c.validate();
    ADD_FAILURE() << "--micro-batch 48 of 64 was accepted";
  } catch (const lt::OptionError& e) {
    EXPECT_EQ(std::string(e.what()), "micro-batch 48 does not divide batch-size 64");
    EXPECT_EQ(e.worded("--"), "--micro-batch 48 does not divide --batch-size 64");
  }
  const lt::OptionError unknown("data", ": unknown data set 'x'");
  EXPECT_EQ(unknown.worded("--"), "--data: unknown data set 'x'");
  // Only the marked mentions become flags: a path holding an option's name stays as it is.
  const lt::OptionError path("backbone", "runs/model/model.pt: no config.json beside it; give {model}", {"model"});
  EXPECT_EQ(std::string(path.what()), "backbone runs/model/model.pt: no config.json beside it; give model");
  EXPECT_EQ(path.worded("--"), "--backbone runs/model/model.pt: no config.json beside it; give --model");
}
