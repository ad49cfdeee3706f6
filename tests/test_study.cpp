// Studies: grid expansion, sharpness (power iteration on Hessian-vector products), the report's choice of settings.
#include <largebatch/largebatch.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "scratch.h"

#include <algorithm>
#include <cmath>
#include <iterator>
#include <filesystem>
#include <fstream>
#include <random>

namespace fs = std::filesystem;
namespace lr = largebatch::report;
namespace lt = largebatch::train;

namespace {

using largebatch_test::ScratchDir;
using largebatch_test::ScratchFile;

std::vector<std::pair<std::string, std::string>> kv(std::initializer_list<std::pair<std::string, std::string>> l) {
  return l;
}

}  // namespace

TEST(Grid, JsonExpandsEveryCombinationInOrder) {
  ScratchFile f(R"({
    "command": "train",
    "fixed": {"data": "synthetic", "epochs": 2, "lr": 0.5, "opt": ["momentum=0.9"]},
    "axes": {
      "optimizer": ["sgd", {"label": "tvlars-fast", "optimizer": "tvlars", "opt": ["lambda=0.01"], "lr": 2}],
      "batch-size": [64, 128],
      "seed": [0, 1, 2]
    }})", ".json");
  const auto g = lr::read_grid(f.path.string());
  EXPECT_EQ(g.command, "train");
  ASSERT_EQ(g.runs.size(), 12u);  // 2 x 2 x 3
  EXPECT_EQ(g.runs[0].name, "optimizer-sgd__batch-size-64__seed-0");
  EXPECT_EQ(g.runs[1].name, "optimizer-sgd__batch-size-64__seed-1");
  EXPECT_EQ(g.runs[3].name, "optimizer-sgd__batch-size-128__seed-0");
  EXPECT_EQ(g.runs[11].name, "tvlars-fast__batch-size-128__seed-2");
  EXPECT_EQ(g.runs[0].settings, kv({{"data", "synthetic"}, {"epochs", "2"}, {"lr", "0.5"}, {"opt", "momentum=0.9"},
                                    {"optimizer", "sgd"}, {"batch-size", "64"}, {"seed", "0"}}));
  // An object value sets several options and overrides the fixed ones it names (lr, opt).
  EXPECT_EQ(g.runs[6].settings, kv({{"data", "synthetic"}, {"epochs", "2"}, {"optimizer", "tvlars"},
                                    {"opt", "lambda=0.01"}, {"lr", "2"}, {"batch-size", "64"}, {"seed", "0"}}));
}

TEST(Grid, TomlGivesTheSameRuns) {
  // toml++ orders a table's keys alphabetically, so these axes expand as batch-size, then optimizer.
  ScratchFile toml(R"(command = "train"
[fixed]
data = "synthetic"
epochs = 2
[axes]
batch-size = [64, 128]
optimizer = ["sgd", { label = "tv", optimizer = "tvlars", opt = ["lambda=0.01"] }]
)", ".toml");
  ScratchFile json(R"({"command": "train", "fixed": {"data": "synthetic", "epochs": 2},
    "axes": {"batch-size": [64, 128], "optimizer": ["sgd", {"label": "tv", "optimizer": "tvlars", "opt": ["lambda=0.01"]}]}})",
                   ".json");
  const auto a = lr::read_grid(toml.path.string()), b = lr::read_grid(json.path.string());
  ASSERT_EQ(a.runs.size(), 4u);
  ASSERT_EQ(b.runs.size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_EQ(a.runs[i].name, b.runs[i].name);
    // Same options; within an inline table toml++ also orders keys alphabetically, and the order of different
    // options on a command line does not matter.
    auto sa = a.runs[i].settings, sb = b.runs[i].settings;
    std::sort(sa.begin(), sa.end());
    std::sort(sb.begin(), sb.end());
    EXPECT_EQ(sa, sb);
  }
  EXPECT_EQ(a.runs[3].name, "batch-size-128__tv");
}

namespace {
// A grid file with TEXT is refused with an error naming the file and containing NEEDLE.
void expect_grid_error(const std::string& text, const std::string& ext, const std::string& needle) {
  ScratchFile f(text, ext);
  try {
    lr::read_grid(f.path.string());
    ADD_FAILURE() << "no error for " << text;
  } catch (const std::invalid_argument& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find(f.path.string()), std::string::npos) << what;
    EXPECT_NE(what.find(needle), std::string::npos) << what;
  }
}
}  // namespace

TEST(Grid, BadGridsNameTheFileAndField) {
  expect_grid_error(R"({"axis": {}})", ".json", "unknown key \"axis\"");
  expect_grid_error(R"({"fixed": {"out": "x"}})", ".json", "'out' is set by the sweep");
  expect_grid_error(R"({"axes": {"lr": []}})", ".json", "axes.lr: must be a non-empty list");
  expect_grid_error(R"({"axes": {"lr": [1, 1]}})", ".json", "share the folder 'lr-1'");
  expect_grid_error(R"({"axes": {"lr": [1], "optimizer": [{"optimizer": "sgd", "lr": 2}]}})", ".json", "both set 'lr'");
  expect_grid_error(R"({"command": "bench"})", ".json", "command 'bench'");
  expect_grid_error(R"({"axes": )", ".json", "not valid JSON");
  expect_grid_error("[axes\nlr = [1]\n", ".toml", "not valid TOML (line 1");
  expect_grid_error("[fixed]\n\"--lr\" = 1\n", ".toml", "without dashes");
}

TEST(Sharpness, MatchesTheTopEigenvalueOfAQuadratic) {
  // loss = 1/2 z^T A z over two parameter tensors (z = [x; y]), A = Q diag(lambda) Q^T: the Hessian is A.
  torch::manual_seed(3);
  const int64_t n = 12;
  const auto q = std::get<0>(torch::linalg_qr(torch::randn({n, n}, torch::kFloat64)));
  auto eigen = torch::linspace(0.1, 2.0, n, torch::kFloat64);
  eigen[n - 1] = 7.5;  // the top one, well separated
  eigen[0] = -1.0;     // one negative direction, smaller in magnitude
  const auto a = q.mm(torch::diag(eigen)).mm(q.t()).to(torch::kFloat32);
  auto x = torch::randn({3, 2}).requires_grad_(true);
  auto y = torch::randn({6}).requires_grad_(true);
  lt::SharpnessOptions o;
  o.max_iterations = 300;
  o.relative_tolerance = 1e-7;
  const auto e = lt::top_hessian_eigenvalue(
      [&] {
        const auto z = torch::cat({x.reshape(-1), y});
        return 0.5 * z.dot(a.mv(z));
      },
      {x, y}, o);
  EXPECT_TRUE(e.converged);
  EXPECT_NEAR(e.eigenvalue, 7.5, 7.5 * 1e-4);
  EXPECT_FALSE(x.grad().defined());  // .grad fields untouched
}

TEST(Sharpness, MeasuringDuringTrainingChangesNothingElse) {
  ScratchDir dir_a("sharp_a"), dir_b("sharp_b");
  const fs::path a = dir_a.path, b = dir_b.path;
  auto config = [](const fs::path& out) {
    lt::TrainConfig c;
    c.data = "synthetic";
    c.synthetic_size = 512;
    c.batch_size = 128;
    c.epochs = 2;
    c.threads = 1;
    c.loader_workers = 1;
    c.progress = "none";
    c.plots = false;
    c.out = out.string();
    return c;
  };
  auto ca = config(a), cb = config(b);
  cb.sharpness_every = 2;
  cb.sharpness_batch = 256;
  cb.sharpness_iterations = 10;
  lt::run_training(ca);
  lt::run_training(cb);
  // Same weights and BatchNorm statistics (every tensor of the model file) with and without the measurement.
  auto load = [](const fs::path& path) {
    largebatch::models::ModelOptions mo;
    auto model = largebatch::models::make_model(mo);
    torch::serialize::InputArchive archive;
    archive.load_from(path.string());
    model->load(archive);
    return model;
  };
  auto ma = load(a / "model.pt"), mb = load(b / "model.pt");
  const auto pa = ma->named_parameters(), pb = mb->named_parameters();
  for (const auto& item : pa) EXPECT_TRUE(torch::equal(item.value(), pb[item.key()])) << item.key();
  const auto ba = ma->named_buffers(), bb = mb->named_buffers();
  ASSERT_GT(ba.size(), 0u);
  for (const auto& item : ba) EXPECT_TRUE(torch::equal(item.value(), bb[item.key()])) << item.key();
  // 8 steps, every 2nd: 4 rows (step, epoch, eigenvalue, iterations, converged, seconds).
  std::ifstream in(b / "sharpness.csv");
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "step,epoch,top_eigenvalue,iterations,converged,seconds");
  int rows = 0;
  while (std::getline(in, line)) {
    ++rows;
    EXPECT_EQ(line.substr(0, line.find(',')), std::to_string(2 * rows));
    const double eigenvalue = std::stod(line.substr(line.find(',', line.find(',') + 1) + 1));
    EXPECT_GT(eigenvalue, 0) << line;
  }
  EXPECT_EQ(rows, 4);
}

TEST(Grid, TheShippedStudyExpands) {
  // studies/fashion-mnist/grid.json: 9 optimizer settings x 3 batch sizes x 3 seeds.
  const auto g = lr::read_grid(std::string(LARGEBATCH_SOURCE_DIR) + "/studies/fashion-mnist/grid.json");
  ASSERT_EQ(g.runs.size(), 81u);
  EXPECT_EQ(g.runs.front().name, "sgd__batch-size-1024__seed-0");
  EXPECT_EQ(g.runs.back().name, "tvlars-paper__batch-size-16384__seed-2");
}

namespace {

// A finished run folder for the report: config.json, a metrics.csv whose last epoch has the given test top-1
// (and validation top-1 when given), summary.json saying completed.
void fake_run(const fs::path& dir, const std::string& lr, int seed, double test_top1, double val_top1) {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << "{\"optimizer\": \"lars\", \"batch-size\": 1024, \"lr\": " << lr
                                     << ", \"seed\": " << seed << "}\n";
  const bool validated = !std::isnan(val_top1);
  std::ofstream metrics(dir / "metrics.csv");
  metrics << "epoch,step,lr,phi,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds"
          << (validated ? ",val_loss,val_top1,val_top5" : "") << "\n";
  metrics << "1,10," << lr << ",1,0.5,0.8,0.6," << test_top1 << ",0.99,1.0";
  if (validated) metrics << ",0.6," << val_top1 << ",0.99";
  metrics << "\n";
  std::ofstream(dir / "summary.json") << "{\"status\": \"completed\"}\n";
}

std::string report_table_2(const fs::path& dir) {
  lr::write_report(dir.string());
  std::ifstream in(dir / "report.md");
  const std::string md((std::istreambuf_iterator<char>(in)), {});
  const auto start = md.find("## Final test top-1 %, optimizer × batch size");
  return md.substr(start, md.find("\n## ", start + 1) - start);
}

}  // namespace

// Settings are chosen on validation where the runs have it, and the chosen setting's test accuracy is reported.
TEST(Report, ChoosesOnValidationWhenRunsHaveIt) {
  ScratchDir dir("report-val");
  // lr 1 is better on validation, lr 2 on the test set.
  for (int seed : {0, 1}) {
    fake_run(dir.path / ("lr1-s" + std::to_string(seed)), "1", seed, 0.80, 0.90);
    fake_run(dir.path / ("lr2-s" + std::to_string(seed)), "2", seed, 0.85, 0.70);
  }
  const std::string validated = report_table_2(dir.path);
  EXPECT_NE(validated.find("| lars | 80.00 ± 0.00 *val* (lr 1) |"), std::string::npos) << validated;
  std::ifstream in(dir.path / "report.md");
  const std::string md((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(md.find("| final val top-1 % |"), std::string::npos);

  // Without validation columns the choice falls on the test set, and the table says so.
  ScratchDir plain("report-test");
  for (int seed : {0, 1}) {
    fake_run(plain.path / ("lr1-s" + std::to_string(seed)), "1", seed, 0.80, NAN);
    fake_run(plain.path / ("lr2-s" + std::to_string(seed)), "2", seed, 0.85, NAN);
  }
  const std::string on_test = report_table_2(plain.path);
  EXPECT_NE(on_test.find("| lars | 85.00 ± 0.00 *test* (lr 2) |"), std::string::npos) << on_test;
}

// ------------------------------------------------------------------ studies: nested axes, selection, follow-ups

TEST(Grid, AValuesOwnAxesVaryRightAfterItForItsRunsOnly) {
  ScratchFile f(R"({
    "fixed": {"epochs": 2, "seed": 0},
    "axes": {
      "optimizer": [{"label": "lamb", "optimizer": "lamb", "axes": {"lr": [0.005, 0.01]}},
                    {"label": "tv", "optimizer": "tvlars",
                     "axes": {"opt": [{"label": "lambda=2/T", "opt": "lambda=2/T"}]}}],
      "batch-size": [64, 128]
    }})", ".json");
  const auto g = lr::read_grid(f.path.string());
  ASSERT_EQ(g.runs.size(), 6u);  // lamb: 2 lr x 2 batch sizes; tv: 1 x 2
  EXPECT_EQ(g.runs[0].name, "lamb__lr-0.005__batch-size-64");
  EXPECT_EQ(g.runs[1].name, "lamb__lr-0.005__batch-size-128");
  EXPECT_EQ(g.runs[2].name, "lamb__lr-0.01__batch-size-64");
  EXPECT_EQ(g.runs[5].name, "tv__lambda=2_T__batch-size-128");  // the label as a folder name
  EXPECT_EQ(g.runs[5].settings, kv({{"epochs", "2"}, {"seed", "0"}, {"optimizer", "tvlars"}, {"opt", "lambda=2/T"},
                                    {"batch-size", "128"}}));
  ASSERT_EQ(g.runs[5].choices.size(), 3u);
  EXPECT_EQ(g.runs[5].choices[1].axis, "opt");
  EXPECT_EQ(g.runs[5].choices[1].value, "lambda=2/T");  // as written, for reports and `where`
  EXPECT_FALSE(g.selects);
}

TEST(Grid, ASelectionPlansFollowUpsFromTheChosenCandidate) {
  ScratchFile f(R"({
    "fixed": {"epochs": 2, "seed": 0, "telemetry-every": 0, "val-split": 100},
    "axes": {"optimizer": [{"label": "lars", "optimizer": "lars", "axes": {"lr": [1, 2]}}, "sgd"],
             "batch-size": [64, 128]},
    "select": {"within": ["optimizer", "batch-size"], "by": "final_val_top1",
               "then": [{"fixed": {"telemetry-every": 5}, "axes": {"seed": [1, 2]}},
                        {"where": {"batch-size": 128, "optimizer": ["lars"]}, "axes": {"init": ["xavier-uniform"]}}],
               "compare": [["lars", "optimizer-sgd"]]}})", ".json");
  const auto g = lr::read_grid(f.path.string());
  ASSERT_TRUE(g.selects);
  EXPECT_EQ(g.selection.within, (std::vector<std::string>{"optimizer", "batch-size"}));
  ASSERT_EQ(g.runs.size(), 6u);
  EXPECT_EQ(lr::selection_cell(g.selection, g.runs[0]), "lars__batch-size-64");
  EXPECT_EQ(lr::selection_cell(g.selection, g.runs[2]), "lars__batch-size-64");  // lr 2: the same cell
  // lars lr 2 at batch 128 chosen: two seeds, then the variant its cell gets.
  const auto& chosen = g.runs[3];
  ASSERT_EQ(chosen.name, "lars__lr-2__batch-size-128");
  const auto runs = lr::follow_ups(g.selection, chosen);
  ASSERT_EQ(runs.size(), 3u);
  EXPECT_EQ(runs[0].name, "lars__lr-2__batch-size-128__seed-1");
  // The block's settings replace the chosen run's (seed 0, telemetry 0), the rest is kept.
  EXPECT_EQ(runs[0].settings, kv({{"epochs", "2"}, {"val-split", "100"}, {"optimizer", "lars"}, {"lr", "2"}, {"batch-size", "128"},
                                  {"telemetry-every", "5"}, {"seed", "1"}}));
  EXPECT_EQ(runs[2].name, "lars__lr-2__batch-size-128__init-xavier-uniform");
  // The variant block does not apply at batch 64.
  EXPECT_EQ(lr::follow_ups(g.selection, g.runs[2]).size(), 2u);
  EXPECT_EQ(lr::follow_ups(g.selection, g.runs[4]).size(), 2u);
  // A pair may name a value by its folder label; it is kept as the grid wrote the value.
  ASSERT_EQ(g.selection.compare.size(), 1u);
  EXPECT_EQ(g.selection.compare[0], std::make_pair(std::string("lars"), std::string("sgd")));
}

TEST(Grid, BadSelectionsNameTheFileAndField) {
  const auto expect_error = [](const std::string& text, const std::string& needle) {
    expect_grid_error(text, ".json", needle);
  };
  const std::string axes = R"("axes": {"lr": [1, 2], "batch-size": [64]}, )";
  expect_error("{" + axes + R"("select": {"within": ["depth"]}})", "select.within: \"depth\" is not one of");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "by": "test_top1"}})", "select.by: 'test_top1'");
  expect_error("{" + axes + R"("select": {"by": "final_val_top1"}})", "select.within is missing");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"fixed": {"epochs": 3}}]}})",
               "select.then[0]: needs \"axes\"");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"where": {"batch-size": 32}, "axes": {"seed": [1]}}]}})",
               "select.then[0].where.batch-size: '32' is not a value");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"where": {"depth": 1}, "axes": {"seed": [1]}}]}})",
               "'depth' is not an axis");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "compare": [["64", "96"]]}})",
               "select.compare: '96' is not a value of the axis 'batch-size'");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"axes": {"seed": [1]}}], "sort": 1}})",
               "select: unknown key \"sort\"");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"where": {"lr": []}, "axes": {"seed": [1]}}]}})",
               "select.then[0].where.lr: an empty list matches no run");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"where": {"lr": [[1]]}, "axes": {"seed": [1]}}]}})",
               "select.then[0].where.lr: [1] is not a value");
  expect_error("{" + axes + R"("select": {"within": ["batch-size"], "then": [{"axes": {"seed": [1]}}]}})",
               "select: candidate lr-1__batch-size-64 holds no validation images");
  expect_error("{" + axes + R"("fixed": {"val-split": 0}, "select": {"within": ["batch-size"], "then": [{"axes": {"seed": [1]}}]}})",
               "set \"val-split\" in \"fixed\"");
  expect_error("{" + axes + R"("fixed": {"val-split": 10, "seed": 3}, "select": {"within": ["batch-size"], "then": [{"axes": {"seed": [3, 4]}}]}})",
               "repeats candidate lr-1__batch-size-64 with its own settings and seed");
  // Choosing among seeds would pick the luckiest draw.
  expect_error(R"({"axes": {"lr": [1, 2], "seed": [0, 1]}, "select": {"within": ["lr"]}})",
               "select: 'seed' is an axis of the candidates");
  // A follow-up may not take an existing folder.
  expect_error(R"({"axes": {"x": [1, {"label": "x-1__seed-1", "x": 2}]}, "select": {"within": ["x"], "then": [{"axes": {"seed": [1]}}]}})",
               "two runs would share the folder 'x-1__seed-1'");
  expect_error(R"({"axes": {"lr": [1]}, "linear-eval": {"epochs": 3}})", "\"linear-eval\" follows pre-training");
  expect_error(R"({"command": "pretrain", "axes": {"lr": [1]}, "linear-eval": {"backbone": "x.pt"}})",
               "'backbone' is the run's own backbone.pt");
  expect_error(R"({"axes": {"lr": [{"lr": 1, "axes": {"seed": [1]}}]}, "select": {"within": ["lr"], "then": [{"axes": {"seed": [{"seed": 2, "axes": {"x": [1]}}]}}]}})",
               "cannot have its own \"axes\"");
}

TEST(Selection, TheBestFiniteValueWinsTheFirstOnATie) {
  EXPECT_EQ(lr::choose({0.8, 0.9, 0.85}, "final_val_top1"), 1);
  EXPECT_EQ(lr::choose({0.9, 0.9, 0.85}, "best_val_top1"), 0);  // tie: grid order
  EXPECT_EQ(lr::choose({NAN, 0.7, INFINITY}, "final_val_top1"), 1);  // diverged and non-finite never win
  EXPECT_EQ(lr::choose({0.5, 0.3, 0.4}, "final_val_loss"), 1);       // a loss: the lowest
  EXPECT_EQ(lr::choose({NAN, NAN}, "final_val_top1"), -1);
  EXPECT_EQ(lr::choose({}, "final_val_top1"), -1);
  EXPECT_TRUE(lr::lower_is_better("final_val_loss"));
  EXPECT_FALSE(lr::lower_is_better("final_val_top1"));
}

namespace {

// A finished run of several epochs: val and test top-1 per epoch, as train writes them.
void fake_epochs(const fs::path& dir, const std::string& config, const std::vector<double>& val,
                 const std::vector<double>& test, const std::string& status = "completed") {
  fs::create_directories(dir);
  std::ofstream(dir / "config.json") << config << "\n";
  std::ofstream metrics(dir / "metrics.csv");
  metrics << "epoch,step,lr,phi,train_loss,train_acc,test_loss,test_top1,test_top5,epoch_seconds,val_loss,val_top1,val_top5\n";
  for (size_t e = 0; e < val.size(); ++e)
    metrics << e + 1 << "," << 10 * (e + 1) << ",1,1,0.5,0.8,0.6," << test[e] << ",0.99,1.0," << 1 - val[e] << ","
            << val[e] << ",0.99\n";
  std::ofstream(dir / "summary.json") << "{\"status\": \"" << status << "\"}\n";
}

std::string read_all(const fs::path& path) {
  std::ifstream in(path);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

}  // namespace

TEST(Selection, MetricsComeFromTheRunsFiles) {
  ScratchDir dir("select-metric");
  fake_epochs(dir.path / "a", "{}", {0.7, 0.9, 0.8}, {0.6, 0.6, 0.6});
  EXPECT_DOUBLE_EQ(lr::selection_metric((dir.path / "a").string(), "final_val_top1"), 0.8);
  EXPECT_DOUBLE_EQ(lr::selection_metric((dir.path / "a").string(), "best_val_top1"), 0.9);
  EXPECT_NEAR(lr::selection_metric((dir.path / "a").string(), "final_val_loss"), 0.2, 1e-12);
  EXPECT_EQ(lr::finished_state((dir.path / "a").string(), false), "completed");
  fake_epochs(dir.path / "d", "{}", {0.9}, {0.9}, "diverged");
  EXPECT_TRUE(std::isnan(lr::selection_metric((dir.path / "d").string(), "final_val_top1")));
  EXPECT_EQ(lr::finished_state((dir.path / "d").string(), false), "diverged");
  EXPECT_TRUE(std::isnan(lr::selection_metric((dir.path / "none").string(), "final_val_top1")));
  EXPECT_EQ(lr::finished_state((dir.path / "none").string(), false), "");
  // Pre-training followed by linear evaluation: finished when both are, measured by the evaluation.
  fs::create_directories(dir.path / "p");
  std::ofstream(dir.path / "p" / "summary.json") << "{\"status\": \"completed\"}\n";
  EXPECT_EQ(lr::finished_state((dir.path / "p").string(), true), "");
  fake_epochs(dir.path / "p" / "linear-eval", "{}", {0.55}, {0.5});
  EXPECT_EQ(lr::finished_state((dir.path / "p").string(), true), "completed");
  EXPECT_DOUBLE_EQ(lr::selection_metric((dir.path / "p").string(), "final_val_top1"), 0.55);
}

// The acceptance check of the tuned study: where validation and test disagree, the report's rule picks by
// validation, reports only the follow-ups' test results, and refuses follow-ups made from another candidate.
TEST(Report, AStudyChoosesByValidationWhereTheTestSetDisagrees) {
  ScratchDir dir("study-report");
  const fs::path d = dir.path;
  auto config = [](const std::string& lr, int seed) {
    return "{\"optimizer\": \"lars\", \"batch-size\": 1024, \"lr\": " + lr + ", \"seed\": " + std::to_string(seed) + "}";
  };
  // lr 1: best on the test set (0.95), worst on validation; lr 2: best on validation; lr 4 diverged.
  fake_epochs(d / "lars__lr-1", config("1", 0), {0.70, 0.80}, {0.90, 0.95});
  fake_epochs(d / "lars__lr-2", config("2", 0), {0.80, 0.90}, {0.60, 0.61});
  fake_epochs(d / "lars__lr-4", config("4", 0), {0.99}, {0.99}, "diverged");
  fake_epochs(d / "lars__lr-2__seed-1", config("2", 1), {0.85, 0.88}, {0.62, 0.63});
  fake_epochs(d / "lars__lr-2__seed-2", config("2", 2), {0.85, 0.87}, {0.64, 0.65});
  auto study = [&](const std::string& from) {
    std::ofstream(d / "study.json") << R"({"format": "lbt-study-1", "grid": "g.json", "command": "train",
      "linear_eval": false, "select": {"within": ["optimizer"], "by": "final_val_top1", "compare": []},
      "cells": [{"cell": "lars", "values": {"optimizer": "lars"}, "candidates": [
        {"run": "lars__lr-1", "over": {"lr": "1"}}, {"run": "lars__lr-2", "over": {"lr": "2"}},
        {"run": "lars__lr-4", "over": {"lr": "4"}}]}],
      "follow_ups": [{"run": "lars__lr-2__seed-1", "from": ")" << from << R"(", "values": {"seed": "1"}},
                     {"run": "lars__lr-2__seed-2", "from": ")" << from << R"(", "values": {"seed": "2"}}]})";
  };
  study("lars__lr-2");
  lr::write_report(d.string());
  const std::string md = read_all(d / "report.md");
  EXPECT_NE(md.find("|  | lr 2 | 90.00 | **chosen** |"), std::string::npos) << md;
  EXPECT_NE(md.find("|  | lr 4 | – | diverged |"), std::string::npos) << md;
  // The chosen lr's follow-ups: mean of 0.63 and 0.65; none of the candidates' test numbers (95, 61) appears.
  EXPECT_NE(md.find("| lars | 64.00 ± 1.41 (n 2) [lr 2] |"), std::string::npos) << md;
  EXPECT_EQ(md.find("95.00"), std::string::npos) << md;
  EXPECT_EQ(md.find("61.00"), std::string::npos) << md;
  // Follow-ups made from a candidate the rule does not choose are refused.
  study("lars__lr-1");
  try {
    lr::write_report(d.string());
    ADD_FAILURE() << "a follow-up from the test-set favourite was accepted";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("chooses lars__lr-2"), std::string::npos) << e.what();
  }
}

TEST(Report, AVariantIsComparedWithTheChosenSettingsOnItsOwnSeeds) {
  ScratchDir dir("study-variant");
  const fs::path d = dir.path;
  auto config = [](int seed, const std::string& init) {
    return "{\"optimizer\": \"lars\", \"batch-size\": 1024, \"lr\": 2, \"seed\": " + std::to_string(seed) +
           ", \"init\": \"" + init + "\"}";
  };
  fake_epochs(d / "lars__lr-2", config(0, "default"), {0.9}, {0.5});
  // The chosen settings on seeds 1-3; the variant on seeds 1 and 2 only.
  fake_epochs(d / "lars__lr-2__seed-1", config(1, "default"), {0.9}, {0.60});
  fake_epochs(d / "lars__lr-2__seed-2", config(2, "default"), {0.9}, {0.62});
  fake_epochs(d / "lars__lr-2__seed-3", config(3, "default"), {0.9}, {0.70});
  fake_epochs(d / "lars__lr-2__init-x__seed-1", config(1, "x"), {0.9}, {0.61});
  fake_epochs(d / "lars__lr-2__init-x__seed-2", config(2, "x"), {0.9}, {0.64});
  fake_epochs(d / "lars__lr-2__seed-9", config(9, "default"), {0.9}, {0.33});  // left from another plan
  std::ofstream(d / "study.json") << R"({"format": "lbt-study-1", "grid": "g.json", "command": "train",
    "linear_eval": false, "select": {"within": ["optimizer"], "by": "final_val_top1", "compare": []},
    "cells": [{"cell": "lars", "values": {"optimizer": "lars"}, "candidates": [{"run": "lars__lr-2", "over": {"lr": "2"}}]}],
    "follow_ups": [{"run": "lars__lr-2__seed-1", "from": "lars__lr-2", "values": {"seed": "1"}},
                   {"run": "lars__lr-2__seed-2", "from": "lars__lr-2", "values": {"seed": "2"}},
                   {"run": "lars__lr-2__seed-3", "from": "lars__lr-2", "values": {"seed": "3"}},
                   {"run": "lars__lr-2__init-x__seed-1", "from": "lars__lr-2", "values": {"init": "x", "seed": "1"}},
                   {"run": "lars__lr-2__init-x__seed-2", "from": "lars__lr-2", "values": {"init": "x", "seed": "2"}}]})";
  lr::write_report(d.string());
  const std::string md = read_all(d / "report.md");
  // As chosen over its three seeds: 64.00 ± 5.29; on the variant's seeds 1 and 2: 61.00 ± 1.41; the variant
  // (61, 64) is ahead by +1 and +2 points.
  EXPECT_NE(md.find("| as chosen | 1, 2, 3 | 64.00 ± 5.29 | – | – | – | – |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 1, 2 | 62.50 ± 2.12 | 61.00 ± 1.41 | +1.00, +2.00 | +1.50 ± 0.71 | 2 of 2 |"), std::string::npos)
      << md;
  // A folder study.json does not list is named and left out of every table.
  EXPECT_NE(md.find("1 finished run outside the study's plan left out** (not in study.json: neither a candidate nor a "
                    "follow-up of a choice): `lars__lr-2__seed-9`"),
            std::string::npos)
      << md;
  EXPECT_EQ(md.find("33.00"), std::string::npos) << md;
}
