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

TEST(Grid, BadGridsNameTheFileAndField) {
  auto expect_error = [](const std::string& text, const std::string& ext, const std::string& needle) {
    ScratchFile f(text, ext);
    try {
      lr::read_grid(f.path.string());
      ADD_FAILURE() << "no error for " << text;
    } catch (const std::invalid_argument& e) {
      const std::string what = e.what();
      EXPECT_NE(what.find(f.path.string()), std::string::npos) << what;
      EXPECT_NE(what.find(needle), std::string::npos) << what;
    }
  };
  expect_error(R"({"axis": {}})", ".json", "unknown key \"axis\"");
  expect_error(R"({"fixed": {"out": "x"}})", ".json", "'out' is set by the sweep");
  expect_error(R"({"axes": {"lr": []}})", ".json", "axes.lr: must be a non-empty list");
  expect_error(R"({"axes": {"lr": [1, 1]}})", ".json", "share the folder 'lr-1'");
  expect_error(R"({"axes": {"lr": [1], "optimizer": [{"optimizer": "sgd", "lr": 2}]}})", ".json", "both set 'lr'");
  expect_error(R"({"command": "bench"})", ".json", "command 'bench'");
  expect_error(R"({"axes": )", ".json", "not valid JSON");
  expect_error("[axes\nlr = [1]\n", ".toml", "not valid TOML (line 1");
  expect_error("[fixed]\n\"--lr\" = 1\n", ".toml", "without dashes");
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
