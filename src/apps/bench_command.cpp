// `largebatch bench pipeline`: input-pipeline images/s against training images/s, measured in one run
// (bench step and bench train are in bench_speed.cpp).
// `largebatch compare A B`: tensor-by-tensor difference of two saved models or checkpoints.
#include "bench_support.h"
#include "commands.h"

#include <largebatch/data/pipeline.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/train/checkpoint.h>
#include <largebatch/train/trainer.h>

#include <torch/torch.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <map>
#include <regex>
#include <thread>

namespace largebatch {
namespace apps {

Runner add_bench_command(CLI::App& app) {
  auto* bench = app.add_subcommand("bench", "Measure speed");
  bench->require_subcommand(1);
  auto* pipe = bench->add_subcommand("pipeline", "Input-pipeline images/s against training images/s, in one run");
  struct Args {
    std::string data = "fashion-mnist", data_dir, augment = "paper", model = "cnn", optimizer = "tvlars";
    int64_t batch = 4096, batches = 12, threads = 0;
    std::vector<int64_t> workers{1, 2};
  };
  auto a = std::make_shared<Args>();
  pipe->add_option("--data", a->data, "Data set")->capture_default_str();
  pipe->add_option("--data-dir", a->data_dir, "Directory of the data set");
  pipe->add_option("--augment", a->augment, "none, flip, crop-flip, paper")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "none", "flip", "crop-flip", "paper"}));
  pipe->add_option("--model", a->model, "Model trained for the training rate")->capture_default_str();
  pipe->add_option("--optimizer", a->optimizer, "Optimizer of the training step")->capture_default_str();
  pipe->add_option("--batch-size", a->batch, "Batch size")->capture_default_str()->check(CLI::PositiveNumber);
  pipe->add_option("--batches", a->batches, "Batches timed per measurement")->capture_default_str()->check(CLI::PositiveNumber);
  pipe->add_option("--workers", a->workers, "Loader worker counts to measure")->capture_default_str();
  pipe->add_option("--threads", a->threads, "Intra-op threads of training (0: all cores)")->capture_default_str();

  Runner step = add_bench_step_command(*bench), train = add_bench_train_command(*bench),
         pretrain = add_bench_pretrain_command(*bench), profile = add_bench_profile_command(*bench);
  return [pipe, a, step, train, pretrain, profile]() -> int {
    if (const int code = step(); code != -1) return code;
    if (const int code = train(); code != -1) return code;
    if (const int code = pretrain(); code != -1) return code;
    if (const int code = profile(); code != -1) return code;
    if (!pipe->parsed()) return -1;
    try {
      const int threads = resolve_threads(a->threads);
      torch::set_num_threads(threads);
      const auto split = data::load_dataset(a->data, a->data_dir);
      std::printf("largebatch bench pipeline: %s, batch %lld, augment %s, %lld batches per measurement\n",
                  a->data.c_str(), static_cast<long long>(a->batch), a->augment.c_str(),
                  static_cast<long long>(a->batches));
      std::printf("| what | images/s | ratio to training |\n| --- | --- | --- |\n");

      // Training rate: forward, backward and optimizer step on batches already in memory.
      models::ModelOptions mo;
      mo.name = a->model;
      mo.num_classes = split.train.num_classes;
      mo.in_channels = split.train.channels();
      mo.image_size = split.train.height();
      auto model = models::make_model(mo);
      const auto recipe = optim::resolve_recipe(a->optimizer, optim::Task::kClassification, a->batch, 0, -1, "auto", {});
      auto opt = optim::make_optimizer({recipe.optimizer, recipe.lr, a->batch, recipe.options},
                                       model->named_parameters());
      data::LoaderOptions lo;
      lo.batch_size = a->batch;
      lo.augment = data::augment_preset(a->augment, a->data);
      lo.workers = 1;
      data::BatchLoader warm(split.train, lo);
      warm.start_epoch(0);
      data::Batch batch;
      warm.next(batch);
      auto step = [&]() {
        opt->zero_grad();
        torch::nn::functional::cross_entropy(model->forward(batch.images), batch.labels).backward();
        opt->step();
      };
      step();  // warm-up
      auto t0 = Clock::now();
      for (int64_t i = 0; i < a->batches; ++i) step();
      const double train_rate = static_cast<double>(a->batch * a->batches) / seconds_since(t0);
      std::printf("| training step (%s, %s, %d threads) | %.0f | 1.00 |\n", a->model.c_str(), a->optimizer.c_str(),
                  threads, train_rate);

      // Pipeline rate: batches assembled and augmented by the loader, nothing else running.
      for (int64_t workers : a->workers) {
        lo.workers = workers;
        data::BatchLoader loader(split.train, lo);
        int64_t images = 0;
        auto t1 = Clock::now();
        for (int64_t epoch = 0; images < a->batch * a->batches; ++epoch) {
          loader.start_epoch(epoch);
          while (images < a->batch * a->batches && loader.next(batch)) images += batch.labels.size(0);
        }
        const double rate = static_cast<double>(images) / seconds_since(t1);
        std::printf("| input pipeline, %lld worker%s | %.0f | %.2f |\n", static_cast<long long>(workers),
                    workers == 1 ? "" : "s", rate, rate / train_rate);
      }
      return 0;
    } catch (const data::DataError& e) {
      std::fprintf(stderr, "largebatch bench: %s\n", e.what());
      return kExitBadInput;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch bench: %s\n", e.what());
      return kExitBadInput;
    }
  };
}

namespace {

// Every tensor of a LibTorch archive (model.pt, or checkpoint.pt's nested archives), by dotted path.
void collect_tensors(torch::serialize::InputArchive& archive, const std::string& prefix,
                     std::map<std::string, torch::Tensor>& out) {
  for (const auto& key : archive.keys()) {
    torch::Tensor t;
    torch::serialize::InputArchive child;
    if (archive.try_read(key, t) || archive.try_read(key, t, /*is_buffer=*/true)) out[prefix + key] = t;
    else if (archive.try_read(key, child)) collect_tensors(child, prefix + key + ".", out);
  }
}

std::map<std::string, torch::Tensor> load_tensors(const std::string& path) {
  torch::serialize::InputArchive archive;
  try {
    largebatch::train::load_archive(path, archive);
  } catch (const largebatch::train::CheckpointError& e) {
    throw std::invalid_argument(e.what());
  }
  std::map<std::string, torch::Tensor> tensors;
  collect_tensors(archive, "", tensors);
  return tensors;
}

}  // namespace

Runner add_compare_command(CLI::App& app) {
  auto* cmd = app.add_subcommand(
      "compare", "Compare two saved models or checkpoints tensor by tensor (exit 0 when all are within tolerance)");
  struct Args {
    std::string a, b, exclude, from;
    double rtol = 1e-5, atol = 1e-6;
    bool quiet = false;
  };
  auto args = std::make_shared<Args>();
  cmd->add_option("A", args->a, "model.pt or checkpoint.pt")->required()->check(existing_file());
  cmd->add_option("B", args->b, "model.pt or checkpoint.pt")->required()->check(existing_file());
  cmd->add_option("--rtol", args->rtol, "Relative tolerance: |a - b| <= atol + rtol |b|")->capture_default_str();
  cmd->add_option("--atol", args->atol, "Absolute tolerance")->capture_default_str();
  cmd->add_flag("--quiet", args->quiet, "Print only the verdict");
  cmd->add_option("--from", args->from,
                  "Compare the updates A - FROM and B - FROM of each tensor as wholes (Euclidean norms): "
                  "|dA - dB| <= atol + rtol |dB|; FROM is the model both started from")
      ->check(existing_file());
  cmd->add_option("--exclude", args->exclude,
                  "Leave out the tensors whose names contain a match of this regular expression (ECMAScript), "
                  "e.g. 'running_|num_batches' for BatchNorm's statistics");
  return [cmd, args]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      std::regex excluded;
      try {
        if (!args->exclude.empty()) excluded = std::regex(args->exclude);
      } catch (const std::regex_error& e) {
        std::fprintf(stderr, "largebatch compare: --exclude '%s': not a regular expression (%s)\n",
                     args->exclude.c_str(), e.what());
        return kExitBadInput;
      }
      // Drops the excluded tensors of one file; returns how many.
      auto drop_excluded = [&](std::map<std::string, torch::Tensor>& tensors) {
        size_t dropped = 0;
        if (args->exclude.empty()) return dropped;
        for (auto it = tensors.begin(); it != tensors.end();) {
          const bool drop = std::regex_search(it->first, excluded);
          it = drop ? tensors.erase(it) : std::next(it);
          dropped += drop ? 1 : 0;
        }
        return dropped;
      };
      auto a = load_tensors(args->a), b = load_tensors(args->b);
      const size_t left_out = drop_excluded(a);
      drop_excluded(b);
      std::map<std::string, torch::Tensor> base;
      if (!args->from.empty()) {
        base = load_tensors(args->from);
        drop_excluded(base);
      }
      int64_t failures = 0;
      double worst_share = 0;
      std::string worst_name;
      // Counts a tensor's share of its tolerance (> 1 fails), keeps the worst and prints the tensor's line.
      auto record = [&](const std::string& name, double share, bool differs, const std::string& detail) {
        if (share > worst_share || std::isnan(share)) {
          worst_share = share;
          worst_name = name;
        }
        const bool ok = share <= 1;
        failures += ok ? 0 : 1;
        if (!args->quiet && (!ok || differs))
          std::printf("%-48s %s  %s\n", name.c_str(), detail.c_str(), ok ? "ok" : "OUT OF TOLERANCE");
      };
      auto format = [](const char* pattern, auto... values) {
        char line[96];
        std::snprintf(line, sizeof line, pattern, values...);
        return std::string(line);
      };
      for (const auto& [name, ta] : a) {
        const auto it = b.find(name);
        if (it == b.end()) {
          std::printf("%s: only in %s\n", name.c_str(), args->a.c_str());
          ++failures;
          continue;
        }
        const auto& tb = it->second;
        if (ta.sizes() != tb.sizes()) {
          std::printf("%s: shape differs\n", name.c_str());
          ++failures;
          continue;
        }
        if (ta.numel() == 0) continue;
        if (!args->from.empty()) {
          const auto from = base.find(name);
          if (from == base.end() || from->second.sizes() != ta.sizes()) {
            std::fprintf(stderr, "largebatch compare: --from %s: %s %s\n", args->from.c_str(), name.c_str(),
                         from == base.end() ? "is missing" : "has another shape");
            return kExitBadInput;
          }
          const auto start = from->second.to(torch::kFloat64);
          const auto da = ta.to(torch::kFloat64) - start, db = tb.to(torch::kFloat64) - start;
          const double gap = (da - db).norm().item<double>();
          const double step = db.norm().item<double>();
          const double share = gap == 0 ? 0.0 : gap / (args->atol + args->rtol * step);
          record(name, share, gap > 0, format("|dA-dB| %.3g of |dB| %.3g", gap, step));
          continue;
        }
        const auto x = ta.to(torch::kFloat64), y = tb.to(torch::kFloat64);
        const auto diff = (x - y).abs();
        const double max_abs = diff.max().item<double>();
        // Share of the tolerance used by the worst element (> 1 fails).
        // Equal elements (equal infinities too) use none of it, even with --atol 0 --rtol 0 (0/0 would be NaN).
        const auto used = diff / (args->atol + args->rtol * y.abs());
        const double share = torch::where(x == y, torch::zeros_like(used), used).max().item<double>();
        record(name, share, max_abs > 0, format("max |a-b| %.3g", max_abs));
      }
      for (const auto& kv : b)
        if (!a.count(kv.first)) {
          std::printf("%s: only in %s\n", kv.first.c_str(), args->b.c_str());
          ++failures;
        }
      if (left_out > 0 && a.empty() && b.empty()) {
        std::fprintf(stderr, "largebatch compare: no tensor left to compare (--exclude '%s' matches all %zu)\n",
                     args->exclude.c_str(), left_out);
        return kExitBadInput;
      }
      const std::string excluded_note =
          args->exclude.empty() ? "" : " (" + std::to_string(left_out) + " left out by --exclude)";
      if (!args->from.empty()) std::printf("updates from %s: ", args->from.c_str());
      std::printf("%zu tensors compared%s; worst %s uses %.3g of the tolerance (atol %g, rtol %g): %s\n", a.size(),
                  excluded_note.c_str(), worst_name.empty() ? "-" : worst_name.c_str(), worst_share, args->atol,
                  args->rtol, failures ? "DIFFERENT" : "equal within tolerance");
      return failures ? 1 : 0;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch compare: %s\n", e.what());
      return kExitBadInput;
    }
  };
}

}  // namespace apps
}  // namespace largebatch
