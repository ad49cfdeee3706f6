// The trainer: end-to-end runs on synthetic data, the validation split, resume equivalence, checkpoints,
// micro-batch equivalence, divergence handling and bad input.
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "scratch.h"
#include "small_runs.h"

#include <algorithm>
#include <atomic>
#include <iostream>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace fs = std::filesystem;
namespace lm = largebatch::models;
namespace lb = largebatch;
namespace lt = largebatch::train;

namespace {

using largebatch_test::ScratchDir;
using largebatch_test::small_run;

// ------------------------------------------------------------------ trainer

lm::Classifier load_model(const fs::path& path, const std::string& name = "cnn") {
  lm::ModelOptions o;
  o.name = name;
  auto model = lm::make_model(o);
  torch::serialize::InputArchive archive;
  archive.load_from(path.string());
  model->load(archive);
  return model;
}

TEST(Trainer, ShortRunOnSyntheticDataLearnsAndWritesEveryOutput) {
  ScratchDir dir("run");
  auto c = small_run(dir.path);
  c.optimizer = "tvlars";
  c.lr = 1.0;
  c.batch_size = 64;
  c.epochs = 4;
  c.telemetry_every = 2;
  c.plots = true;
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "completed");
  ASSERT_EQ(s.history.size(), 4u);
  EXPECT_LT(s.history.back().train_loss, 0.5 * s.history.front().train_loss);
  EXPECT_GT(s.final_test_top1, 0.9);  // 10 classes: chance is 0.1
  for (const char* f : {"config.json", "metrics.csv", "summary.json", "checkpoint.pt", "model.pt", "telemetry.csv"})
    EXPECT_TRUE(fs::exists(dir.path / f)) << f;
  std::ifstream metrics(dir.path / "metrics.csv");
  std::string line;
  int rows = -1;
  while (std::getline(metrics, line)) ++rows;
  EXPECT_EQ(rows, 4);
  std::ifstream summary(dir.path / "summary.json");
  const auto j = nlohmann::json::parse(summary);
  EXPECT_EQ(j["status"], "completed");
  EXPECT_EQ(j["best_test_top1"].get<double>(), s.best_test_top1);
  // Plots: one line per layer from inline data blocks (interleaved CSV rows would break filtered lines).
  if (largebatch::report::gnuplot_available()) {
    for (const char* f : {"curves.png", "loss.png", "trust_ratios.png"}) EXPECT_GT(fs::file_size(dir.path / f), 1000u) << f;
    std::ifstream gp(dir.path / "trust_ratios.gp");
    std::stringstream script;
    script << gp.rdbuf();
    EXPECT_NE(script.str().find("$L3 << EOD"), std::string::npos);  // conv1, conv2, fc1, fc: four layers
    EXPECT_NE(script.str().find("title 'fc1.weight'"), std::string::npos);
  }
  // The saved config reloads to the same configuration.
  std::ifstream cfg(dir.path / "config.json");
  std::stringstream ss;
  ss << cfg.rdbuf();
  EXPECT_EQ(lt::TrainConfig::from_json(ss.str(), "config.json").to_json(), c.to_json());
  // The CPU kernels' switch, under its name and under the one configs written before max pooling joined carry.
  EXPECT_TRUE(c.cpu_kernels);
  EXPECT_FALSE(lt::TrainConfig::from_json(R"({"cpu-kernels": false})", "config.json").cpu_kernels);
  EXPECT_FALSE(lt::TrainConfig::from_json(R"({"small-map-kernels": false})", "config.json").cpu_kernels);
  EXPECT_NE(c.to_json().find("\"cpu-kernels\": true"), std::string::npos);
}

// An engine preset named explicitly runs with exactly its values, and summary.json records what ran.
TEST(Trainer, AnExplicitPresetRunsWithItsOwnValuesAndTheRunRecordsThem) {
  // One epoch of the mlp (4 steps); summary.json's optimizer_resolved.
  auto resolved_by = [](const std::string& optimizer) {
    ScratchDir dir("preset");
    auto c = small_run(dir.path);
    c.model = "mlp";
    c.optimizer = optimizer;
    c.epochs = 1;
    EXPECT_EQ(lt::run_training(c).status, "completed");
    std::ifstream summary(dir.path / "summary.json");
    return nlohmann::json::parse(summary).at("optimizer_resolved");
  };
  const auto j = resolved_by("tvlars:paper");
  EXPECT_EQ(j.at("recipe"), "tvlars:paper");
  EXPECT_EQ(j.at("builds"), "tvlars:paper");
  EXPECT_DOUBLE_EQ(j.at("lr").get<double>(), 2.0);
  EXPECT_EQ(j.at("schedule"), "constant");
  EXPECT_EQ(j.at("total_steps"), 4);  // 512 images / 128
  EXPECT_TRUE(j.at("options").empty());
  const std::string engine = j.at("engine");
  EXPECT_NE(engine.find("eta=0.001 "), std::string::npos) << engine;
  EXPECT_NE(engine.find("lambda=0.001"), std::string::npos) << engine;
  // The trainer's own recipe says what it changed.
  const auto t = resolved_by("tvlars");
  EXPECT_EQ(t.at("builds"), "tvlars:reference");
  EXPECT_EQ(t.at("options").at("eta"), "0.002");
  EXPECT_EQ(t.at("options").at("lambda"), "0.5");  // 2 / T, T = 4 steps
}

std::string file_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TEST(ValidationSplit, HoldsOutAFixedDisjointSetWhateverTheSeed) {
  namespace ld = largebatch::data;
  ld::ImageDataset d;
  d.name = "rows";
  const int64_t n = 1000;
  d.images = torch::arange(n, torch::kLong).remainder(256).to(torch::kUInt8).view({n, 1, 1, 1}).repeat({1, 1, 2, 2});
  d.labels = torch::arange(n, torch::kLong);  // each image's label is its row
  d.num_classes = n;
  d.mean = {0.5f};
  d.std = {0.25f};
  const auto a = ld::hold_out(d, 100), b = ld::hold_out(d, 100);
  ASSERT_EQ(a.validation.size(), 100);
  ASSERT_EQ(a.train.size(), 900);
  EXPECT_TRUE(torch::equal(a.validation.labels, b.validation.labels));  // the same images every time
  const auto all = std::get<0>(torch::cat({a.train.labels, a.validation.labels}).sort());
  EXPECT_TRUE(torch::equal(all, torch::arange(n, torch::kLong)));  // disjoint, and nothing lost
  EXPECT_TRUE(torch::equal(a.validation.labels, std::get<0>(a.validation.labels.sort())));  // order kept
  EXPECT_TRUE(torch::equal(a.validation.images.flatten(1).select(1, 0),
                           a.validation.labels.remainder(256).to(torch::kUInt8)));  // images travel with labels
  EXPECT_EQ(a.train.mean, d.mean);
  // Spread over the set, not its head or tail.
  EXPECT_LT(a.validation.labels.min().item<int64_t>(), 100);
  EXPECT_GT(a.validation.labels.max().item<int64_t>(), 900);
  EXPECT_THROW(ld::hold_out(d, 0), std::invalid_argument);
  EXPECT_THROW(ld::hold_out(d, n), std::invalid_argument);
}

TEST(ValidationSplit, TrainRecordsValidationAndSelectsOnIt) {
  ScratchDir dir("val");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lamb";
  c.val_split = 128;
  c.epochs = 3;
  const auto s = lt::run_training(c);
  ASSERT_EQ(s.status, "completed");
  std::ifstream metrics(dir.path / "metrics.csv");
  std::string header, row;
  std::getline(metrics, header);
  EXPECT_NE(header.find(",val_loss,val_top1,val_top5"), std::string::npos) << header;
  std::getline(metrics, row);
  EXPECT_EQ(row.find(",,"), std::string::npos) << "empty validation fields: " << row;
  double best_val = -1;
  int64_t best_epoch = 0;
  for (const auto& r : s.history) {
    ASSERT_TRUE(std::isfinite(r.val_top1));
    if (r.val_top1 > best_val) best_val = r.val_top1, best_epoch = r.epoch;
  }
  EXPECT_EQ(s.selected_epoch, best_epoch);
  EXPECT_DOUBLE_EQ(s.selected_test_top1, s.history[static_cast<size_t>(best_epoch - 1)].test_top1);
  std::ifstream summary(dir.path / "summary.json");
  const auto j = nlohmann::json::parse(summary);
  EXPECT_EQ(j.at("val_split"), 128);
  EXPECT_EQ(j.at("selected_epoch"), best_epoch);
  // A resume must hold out the same images.
  auto other = c;
  other.val_split = 64;
  other.epochs = 4;
  other.resume = true;
  try {
    lt::run_training(other);
    ADD_FAILURE() << "a resume with another --val-split ran";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("val-split"), std::string::npos) << e.what();
  }
  // More than the training set: named.
  ScratchDir too_many("val-too-many");
  auto big = small_run(too_many.path);
  big.val_split = 512;
  try {
    lt::run_training(big);
    ADD_FAILURE() << "--val-split 512 of 512 images ran";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("val-split"), std::string::npos) << e.what();
  }
}

// `train --data synthetic --model mlp --optimizer tvlars:paper --epochs 1 --val-split 256`, then the same run
// built from its config.json alone: the same bits.
TEST(Trainer, ARunRebuiltFromItsConfigJsonAloneIsBitIdentical) {
  ScratchDir first("from-config-a"), second("from-config-b");
  lt::TrainConfig c;
  c.data = "synthetic";
  c.model = "mlp";
  c.optimizer = "tvlars:paper";
  c.epochs = 1;
  c.val_split = 256;
  c.threads = 1;
  c.progress = "none";
  c.plots = false;
  c.out = first.path.string();
  ASSERT_EQ(lt::run_training(c).status, "completed");
  auto again = lt::TrainConfig::from_json(file_bytes(first.path / "config.json"), "config.json");
  again.out = second.path.string();
  ASSERT_EQ(lt::run_training(again).status, "completed");
  EXPECT_EQ(file_bytes(first.path / "model.pt"), file_bytes(second.path / "model.pt"));
  auto metrics = [](const fs::path& p) {  // without the time columns
    std::ifstream in(p);
    std::string line, kept;
    while (std::getline(in, line)) {
      std::stringstream ss(line);
      std::string field;
      for (int i = 0; i < 9 && std::getline(ss, field, ','); ++i) kept += field + ",";
      kept += "\n";
    }
    return kept;
  };
  EXPECT_EQ(metrics(first.path / "metrics.csv"), metrics(second.path / "metrics.csv"));
  const auto j = nlohmann::json::parse(file_bytes(first.path / "summary.json"));
  EXPECT_NE(j.at("optimizer_resolved").at("engine").get<std::string>().find("eta=0.001 "), std::string::npos);
  EXPECT_DOUBLE_EQ(j.at("optimizer_resolved").at("lr").get<double>(), 2.0);
  const auto recorded = nlohmann::json::parse(file_bytes(first.path / "config.json"));
  EXPECT_EQ(recorded.at("val-split"), 256);
  EXPECT_DOUBLE_EQ(recorded.at("lr").get<double>(), 2.0);  // the lr used, not "the recipe's"
}

TEST(Trainer, ResumeEqualsAnUninterruptedRun) {
  ScratchDir straight("straight"), split("split");
  auto a = small_run(straight.path);
  a.optimizer = "lamb";
  a.augment = "paper";  // augmentation randomness must continue identically too
  lt::run_training(a);

  auto b = small_run(split.path);
  b.optimizer = "lamb";
  b.augment = "paper";
  b.epochs = 1;
  lt::run_training(b);
  b.epochs = 3;
  b.resume = true;
  const auto s = lt::run_training(b);
  EXPECT_EQ(s.history.size(), 3u);

  auto ma = load_model(straight.path / "model.pt"), mb = load_model(split.path / "model.pt");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
}

// A run killed after creating its per-step logs but before their header reached the disk leaves them empty;
// resuming treats an empty log as one with no rows (it held none) and gives each its header.
TEST(Trainer, ResumeAcceptsPerStepLogsTheInterruptionLeftEmpty) {
  ScratchDir dir("empty-logs");
  auto c = small_run(dir.path);
  c.telemetry_every = 2;
  c.sharpness_every = 4;
  c.sharpness_batch = 64;  // the estimates only have to exist: small ones keep the test short under the sanitizers
  c.sharpness_iterations = 3;
  c.epochs = 1;
  lt::run_training(c);
  for (const char* name : {"telemetry.csv", "sharpness.csv"}) std::ofstream(dir.path / name, std::ios::trunc);
  c.epochs = 2;
  c.resume = true;
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.history.size(), 2u);
  for (const char* name : {"telemetry.csv", "sharpness.csv"}) {
    std::ifstream in(dir.path / name);
    std::string header, row;
    ASSERT_TRUE(std::getline(in, header)) << name;
    EXPECT_EQ(header.rfind("step,", 0), 0u) << name << ": " << header;
    EXPECT_TRUE(std::getline(in, row) && !row.empty()) << name << ": no rows after the resume";
  }
}

void expect_same_weights(const fs::path& a_dir, const fs::path& b_dir) {
  auto ma = load_model(a_dir / "model.pt"), mb = load_model(b_dir / "model.pt");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
}

void expect_same_history(const lt::TrainSummary& a, const lt::TrainSummary& b) {
  ASSERT_EQ(a.history.size(), b.history.size());
  for (size_t i = 0; i < a.history.size(); ++i) {  // every figure but the timings
    EXPECT_EQ(a.history[i].step, b.history[i].step);
    EXPECT_EQ(a.history[i].lr, b.history[i].lr);
    EXPECT_EQ(a.history[i].train_loss, b.history[i].train_loss) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].train_acc, b.history[i].train_acc) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].test_loss, b.history[i].test_loss) << "epoch " << i + 1;
    EXPECT_EQ(a.history[i].test_top1, b.history[i].test_top1) << "epoch " << i + 1;
  }
}

// --checkpoint-every N writes checkpoints within epochs; a run that dies after one (as a SIGKILL leaves it)
// resumes from it, in the middle of an epoch, and ends exactly as an uninterrupted run: weights, and every
// epoch's metrics (the resumed epoch's sums are carried in the checkpoint).
TEST(Trainer, ResumeWithinAnEpochEqualsAnUninterruptedRun) {
  ScratchDir straight("straight-within"), crashed("crashed-within");
  auto a = small_run(straight.path);  // 3 epochs of 4 steps
  a.optimizer = "lamb";
  a.augment = "paper";
  a.telemetry_every = 1;
  const auto sa = lt::run_training(a);

  auto b = a;
  b.out = crashed.path.string();
  b.checkpoint_every = 3;
  b.crash_after_step = 6;  // dies after its 7th step: the last checkpoint is the one after step 6 (epoch 2, batch 2)
  EXPECT_THROW(lt::run_training(b), lt::SimulatedCrash);
  EXPECT_FALSE(fs::exists(crashed.path / "model.pt"));
  {
    torch::serialize::InputArchive archive;
    lt::load_archive(crashed.path / "checkpoint.pt", archive);
    c10::IValue meta;
    archive.read("meta", meta);
    const auto j = nlohmann::json::parse(meta.toStringRef());
    EXPECT_EQ(j.at("step"), 6);
    EXPECT_EQ(j.at("epoch"), 1);
    EXPECT_EQ(j.at("within_epoch").at("batch"), 2);
  }
  b.crash_after_step = -1;
  b.resume = true;
  const auto sb = lt::run_training(b);
  expect_same_weights(straight.path, crashed.path);
  expect_same_history(sa, sb);
  // telemetry.csv holds each step once, as the uninterrupted run's.
  auto rows = [](const fs::path& p) {
    std::ifstream in(p);
    std::string line;
    int64_t n = 0;
    while (std::getline(in, line)) ++n;
    return n;
  };
  EXPECT_EQ(rows(straight.path / "telemetry.csv"), rows(crashed.path / "telemetry.csv"));
}

// A stop request (Ctrl-C, SIGTERM) writes a checkpoint at the step the run stops after, wherever that falls,
// so the resumed run repeats no step and still ends exactly as an uninterrupted run.
TEST(Trainer, StopRequestCheckpointsWhereItStops) {
  ScratchDir straight("straight-stop"), stopped("stopped");
  auto a = small_run(straight.path);
  a.epochs = 4;
  const auto sa = lt::run_training(a);

  auto b = a;
  b.out = stopped.path.string();
  std::atomic<bool> done{false};
  std::thread stopper([&] {  // asks to stop as soon as the first checkpoint exists (early in epoch 2 of 4)
    while (!done && !fs::exists(stopped.path / "checkpoint.pt")) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    lt::request_stop();
  });
  const auto first = lt::run_training(b);
  done = true;
  stopper.join();
  ASSERT_EQ(first.status, "interrupted") << "the run ended before the stop request; make it longer";
  torch::serialize::InputArchive archive;
  lt::load_archive(stopped.path / "checkpoint.pt", archive);
  c10::IValue meta;
  archive.read("meta", meta);
  EXPECT_EQ(nlohmann::json::parse(meta.toStringRef()).at("step"), first.steps) << "the checkpoint is not where it stopped";
  b.resume = true;
  const auto sb = lt::run_training(b);
  expect_same_weights(straight.path, stopped.path);
  expect_same_history(sa, sb);
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}
void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
}

// A resume refuses a truncated, damaged or foreign checkpoint with a message naming the file and the defect,
// before LibTorch reads it; the intact file still resumes.
TEST(Checkpoint, TruncatedDamagedAndForeignFilesAreRefused) {
  ScratchDir dir("damaged");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.epochs = 1;
  lt::run_training(c);
  const fs::path ckpt = dir.path / "checkpoint.pt";
  const std::string good = read_bytes(ckpt);
  ASSERT_EQ(good.compare(0, 22, "largebatch-checkpoint\n"), 0);
  c.resume = true;
  c.epochs = 2;
  auto refused = [&](const std::string& bytes, const std::string& why) {
    write_bytes(ckpt, bytes);
    try {
      lt::run_training(c);
      ADD_FAILURE() << "resumed from a checkpoint that is " << why;
    } catch (const lt::UsageError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find(ckpt.string()), std::string::npos) << m;
      EXPECT_NE(m.find(why), std::string::npos) << m;
    }
  };
  refused(good.substr(0, good.size() / 2), "truncated");
  refused(good.substr(0, 30), "truncated");
  std::string flipped = good;
  flipped[flipped.size() / 2] ^= 0x10;
  refused(flipped, "damaged: CRC-32");
  refused(good + "x", "trailing data");
  refused(good.substr(38), "bare LibTorch archive");  // the payload alone: a zip without our header
  refused("hello", "not a largebatch checkpoint");
  std::string version = good;
  version[22] = 9;
  refused(version, "format version 9");

  write_bytes(ckpt, good);
  EXPECT_EQ(lt::run_training(c).history.size(), 2u);
  // Every reader takes both kinds of file: the verified checkpoint and the bare model.pt.
  torch::serialize::InputArchive a, b;
  lt::load_archive(ckpt, a);
  lt::load_archive(dir.path / "model.pt", b);
  torch::serialize::InputArchive model_part;
  EXPECT_TRUE(a.try_read("model", model_part));
  EXPECT_THROW(lt::load_archive(dir.path / "config.json", b), lt::CheckpointError);
  // A finished run that lost its checkpoint is not started again over its results.
  fs::remove(ckpt);
  try {
    lt::run_training(c);
    ADD_FAILURE() << "resumed a completed run without a checkpoint";
  } catch (const lt::UsageError& e) {
    EXPECT_NE(std::string(e.what()).find("holds a completed run's results but no checkpoint.pt"), std::string::npos)
        << e.what();
  }
}

TEST(Trainer, MicroBatchesEqualOneBigBatchWithoutBatchNorm) {
  ScratchDir whole("whole"), micro("micro");
  auto a = small_run(whole.path);
  a.model = "mlp";
  a.optimizer = "lars";
  a.lr = 2.0;
  a.epochs = 2;
  lt::run_training(a);
  auto b = a;
  b.out = micro.path.string();
  b.micro_batch = 32;
  lt::run_training(b);
  auto ma = load_model(whole.path / "model.pt", "mlp"), mb = load_model(micro.path / "model.pt", "mlp");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) {
    EXPECT_TRUE(torch::allclose(item.value(), pb[item.key()], 1e-4, 1e-6)) << item.key();
  }
}

// The training loss against its formula: (1 - e) CE + e times the mean over classes of -log p, and for a mixed
// batch the lambda-weighted sum over the two labels.
TEST(Loss, LabelSmoothingAndMixingEqualTheirFormulas) {
  torch::manual_seed(3);
  const auto logits = torch::randn({6, 5}, torch::kDouble);
  const auto y = torch::tensor({0, 1, 2, 3, 4, 0}, torch::kLong), y2 = y.flip(0);
  const auto logp = torch::log_softmax(logits, 1);
  const auto nll = [&](const torch::Tensor& labels) { return -logp.gather(1, labels.unsqueeze(1)).squeeze(1); };
  for (const double e : {0.0, 0.1, 0.3}) {
    const auto smoothed = [&](const torch::Tensor& labels) {
      return ((1 - e) * nll(labels) + e * (-logp).mean(1)).sum().item<double>();
    };
    EXPECT_NEAR(lt::classification_loss_sum(logits, y, torch::Tensor(), 1, e).item<double>(), smoothed(y), 1e-12);
    const double lam = 0.7;
    EXPECT_NEAR(lt::classification_loss_sum(logits, y, y2, lam, e).item<double>(),
                lam * smoothed(y) + (1 - lam) * smoothed(y2), 1e-12);
  }
}

// Label smoothing, mixup and CutMix in a run: they change the trajectory, are recorded, and a run with them is
// reproducible.
TEST(Trainer, LabelSmoothingMixupAndCutmixRun) {
  ScratchDir plain("reg-plain"), mixed("reg-mixed");
  auto a = largebatch_test::small_run(plain.path);
  a.epochs = 1;
  const auto sa = lt::run_training(a);
  ASSERT_EQ(sa.status, "completed");
  auto b = a;
  b.out = mixed.path.string();
  b.label_smoothing = 0.1;
  b.mixup = 0.2;
  b.cutmix = 1.0;
  const auto sb = lt::run_training(b);
  ASSERT_EQ(sb.status, "completed") << sb.message;
  EXPECT_NE(sb.history.back().train_loss, sa.history.back().train_loss);
  const auto config = nlohmann::json::parse(std::ifstream(mixed.path / "config.json"));
  EXPECT_EQ(config.at("label-smoothing").get<double>(), 0.1);
  EXPECT_EQ(config.at("mixup").get<double>(), 0.2);
  EXPECT_EQ(config.at("cutmix").get<double>(), 1.0);
  ScratchDir repeat("reg-repeat");
  auto c = b;
  c.out = repeat.path.string();
  c.loader_workers = 2;
  const auto sc = lt::run_training(c);
  EXPECT_EQ(sc.history.back().train_loss, sb.history.back().train_loss) << "the same mixing with 2 loader workers";
}

// The guard turns bf16 autocast on for its scope only, and a bf16 run trains float32 weights whose loss falls.
TEST(Precision, AutocastGuardScopesBf16) {
  const auto a = torch::randn({4, 4}), b = torch::randn({4, 4});
  {
    const lt::AutocastGuard on(true, torch::kCPU);
    EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kBFloat16);
    {
      const lt::AutocastGuard off(false, torch::kCPU);
      EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kBFloat16) << "an off guard changes nothing";
    }
  }
  EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kFloat);
  EXPECT_FALSE(at::autocast::is_cpu_enabled());
  EXPECT_THROW(lt::is_bf16("fp16"), std::invalid_argument);
}

// The LR range test on the synthetic set: the loss falls, then diverges at large lr; its minimum is inside the
// range, and the CSV and the summary are written (the PNG where gnuplot is installed).
TEST(LrFind, FindsTheLossMinimumInsideTheRangeAndWritesItsFiles) {
  ScratchDir out("lr-find");
  auto c = small_run(out.path);
  c.optimizer = "sgd";
  lt::LrFindOptions o;
  o.lr_min = 1e-3;
  o.lr_max = 1e4;
  o.steps = 60;
  const auto r = lt::run_lr_find(c, o);
  ASSERT_FALSE(r.lr.empty());
  EXPECT_EQ(r.lr.front(), 1e-3);
  EXPECT_GT(r.min_loss_lr, o.lr_min) << "the loss kept rising from the start";
  EXPECT_LT(r.min_loss_lr, r.lr.back()) << "the loss was still falling at the end of the range";
  EXPECT_NE(r.stopped, "range end") << "a range up to lr 1e4 must diverge";
  EXPECT_DOUBLE_EQ(r.suggested_lr, r.min_loss_lr / 10);
  const auto lowest = *std::min_element(r.smoothed.begin(), r.smoothed.end());
  EXPECT_LT(lowest, r.smoothed.front());
  EXPECT_TRUE(fs::exists(out.path / "lr_find.csv"));
  const auto summary = nlohmann::json::parse(std::ifstream(out.path / "lr_find.json"));
  EXPECT_EQ(summary.at("suggested_lr").get<double>(), r.suggested_lr);
  EXPECT_EQ(summary.at("steps_taken").get<size_t>(), r.lr.size());
  if (lb::report::gnuplot_available()) EXPECT_TRUE(fs::exists(out.path / "lr_find.png"));
  else std::cout << "[ SKIP     ] lr_find.png: gnuplot is not installed\n";
  o.lr_max = o.lr_min;
  EXPECT_THROW(lt::run_lr_find(c, o), lt::UsageError);
}

TEST(Trainer, DivergenceStopsAndNamesTheStepAndLayer) {
  ScratchDir dir("diverge");
  auto c = small_run(dir.path);
  c.optimizer = "lars";
  c.lr = 1e30;
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_NE(s.message.find("non-finite loss"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("at step"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("largest trust ratio"), std::string::npos) << s.message;
  std::ifstream summary(dir.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["status"], "diverged");
}

// --on-nonfinite: a NaN gradient (injected after the all-reduce, as an overflow leaves it) stops the run naming
// the step and layer, or is skipped without any state change.
TEST(OnNonfinite, StopNamesTheStepAndTheLayer) {
  ScratchDir dir("nonfinite-stop");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lars";
  c.inject_nonfinite_gradient_at = {2};
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_NE(s.message.find("non-finite gradient in fc1.weight at step 2"), std::string::npos) << s.message;
  EXPECT_NE(s.message.find("on-nonfinite skip"), std::string::npos) << s.message;
  std::ifstream summary(dir.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["status"], "diverged");
  EXPECT_FALSE(fs::exists(dir.path / "model.pt"));  // nothing presented as a finished model
}

TEST(OnNonfinite, SkippedStepsChangeNothing) {
  // mlp (no BatchNorm buffers), constant lr: skipping every step of epoch 2 must leave exactly the weights of
  // a run that stopped after epoch 1, and the optimizer must have taken only epoch 1's steps.
  ScratchDir one("nonfinite-one"), skipped("nonfinite-skip");
  auto a = small_run(one.path);
  a.model = "mlp";
  a.optimizer = "lars";
  a.epochs = 1;
  lt::run_training(a);
  auto b = a;
  b.out = skipped.path.string();
  b.epochs = 2;
  b.on_nonfinite = "skip";
  b.inject_nonfinite_gradient_at = {4, 5, 6, 7};  // 512 images / 128 = 4 steps per epoch
  const auto s = lt::run_training(b);
  EXPECT_EQ(s.status, "completed") << s.message;
  EXPECT_EQ(s.skipped_steps, 4);
  EXPECT_EQ(s.steps, 8);
  auto ma = load_model(one.path / "model.pt", "mlp"), mb = load_model(skipped.path / "model.pt", "mlp");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  std::ifstream summary(skipped.path / "summary.json");
  EXPECT_EQ(nlohmann::json::parse(summary)["skipped_steps"], 4);
  // The count survives a resume (it is kept in the checkpoint).
  b.epochs = 3;
  b.resume = true;
  b.inject_nonfinite_gradient_at = {9};
  const auto r = lt::run_training(b);
  EXPECT_EQ(r.status, "completed") << r.message;
  EXPECT_EQ(r.skipped_steps, 5);
}

TEST(OnNonfinite, SkippingCannotHideARunThatCannotRecover) {
  ScratchDir dir("nonfinite-limit");
  auto c = small_run(dir.path);
  c.model = "mlp";
  c.optimizer = "lars";
  c.on_nonfinite = "skip";
  c.skip_limit = 3;
  c.inject_nonfinite_gradient_at = {1, 2, 3, 4, 5};
  const auto s = lt::run_training(c);
  EXPECT_EQ(s.status, "diverged");
  EXPECT_EQ(s.skipped_steps, 2);
  EXPECT_NE(s.message.find("3 steps skipped in a row (skip-limit 3)"), std::string::npos) << s.message;

  // An absurd learning rate: the losses after the first step are not finite, every step would be skipped.
  ScratchDir absurd("nonfinite-absurd");
  auto d = small_run(absurd.path);
  d.model = "mlp";
  d.optimizer = "lars";
  d.lr = 1e30;
  d.on_nonfinite = "skip";
  d.skip_limit = 5;  // the run has 12 steps
  const auto t = lt::run_training(d);
  EXPECT_EQ(t.status, "diverged") << t.message;
  EXPECT_FALSE(fs::exists(absurd.path / "model.pt"));

  // The count of steps skipped in a row runs across epochs, and across a resume at an epoch's end: skips at the
  // last step of epoch 1 and the first of epoch 2 reach --skip-limit 2 whether or not the run was resumed between.
  ScratchDir across("nonfinite-across");
  auto e = small_run(across.path);  // 4 steps per epoch
  e.model = "mlp";
  e.on_nonfinite = "skip";
  e.skip_limit = 2;
  e.inject_nonfinite_gradient_at = {3, 4};
  EXPECT_EQ(lt::run_training(e).status, "diverged");
  ScratchDir resumed("nonfinite-resumed");
  auto f = e;
  f.out = resumed.path.string();
  f.epochs = 1;
  ASSERT_EQ(lt::run_training(f).status, "completed");
  f.epochs = 3;
  f.resume = true;
  const auto u = lt::run_training(f);
  EXPECT_EQ(u.status, "diverged") << u.message;
  EXPECT_NE(u.message.find("2 steps skipped in a row"), std::string::npos) << u.message;
}

// The library names options by their keys (config.json's); the command line shows them as flags.
TEST(Trainer, BadInputIsAUsageErrorNamingTheOption) {
  ScratchDir dir("bad");
  auto expect_usage = [&](lt::TrainConfig c, const std::string& needle) {
    try {
      lt::run_training(c);
      ADD_FAILURE() << "no error for " << needle;
    } catch (const lt::UsageError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto c = small_run(dir.path);
  auto bad = c;
  bad.micro_batch = 100;
  expect_usage(bad, "micro-batch 100 does not divide batch-size 128");
  bad = c;
  bad.model = "vgg";
  expect_usage(bad, "model: unknown model 'vgg'");
  bad = c;
  bad.optimizer = "adamax";
  expect_usage(bad, "optimizer: ");
  bad = c;
  bad.optimizer_options["momentun"] = "0.9";
  expect_usage(bad, "momentun");
  {  // --resume with nothing to resume from starts from the beginning (a retry loop can always pass it)
    ScratchDir fresh("resume-fresh");
    auto r = small_run(fresh.path);
    r.epochs = 1;
    r.resume = true;
    EXPECT_EQ(lt::run_training(r).history.size(), 1u);
  }
  bad = c;
  bad.device = "cuda";
  if (!torch::cuda::is_available()) expect_usage(bad, "device cuda");
  // An existing run is never overwritten.
  lt::run_training(c);
  expect_usage(c, "already holds a run");
  bad = c;
  bad.resume = true;
  bad.batch_size = 64;
  expect_usage(bad, "batch-size differs");
}

}  // namespace
