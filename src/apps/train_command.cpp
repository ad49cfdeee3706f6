// `largebatch train`: every option is a flag and a key of a JSON or TOML config file (--config).
#include "commands.h"

#include <largebatch/data/dataset.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/dist/dist.h>
#include <largebatch/train/trainer.h>


#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdlib>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>

namespace largebatch {
namespace apps {

namespace {

void on_signal(int) {
  train::request_stop();
  std::signal(SIGINT, SIG_DFL);  // a second Ctrl-C ends the process at once
  std::signal(SIGTERM, SIG_DFL);
}

std::string list(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

ConsoleReporter::ConsoleReporter(std::string command, const std::string& mode) : command_(std::move(command)) {
  bar_ = mode == "bar" || (mode == "auto" && isatty(fileno(stderr)));
  quiet_ = mode == "none";
}

void ConsoleReporter::info(const std::string& line) {
  if (bar_) std::fprintf(stderr, "\r%120s\r", "");
  std::printf("%s\n", line.c_str());
  std::fflush(stdout);
}

void ConsoleReporter::warning(const std::string& line) {
  if (bar_) std::fprintf(stderr, "\r%120s\r", "");
  std::fprintf(stderr, "largebatch %s: %s\n", command_.c_str(), line.c_str());
}

void ConsoleReporter::step(int64_t epoch, int64_t epochs, int64_t index, int64_t steps, const std::string& fields) {
  if (!bar_) return;
  const int width = 30;
  const int filled = static_cast<int>(width * (index + 1) / std::max<int64_t>(1, steps));
  std::fprintf(stderr, "\repoch %lld/%lld [%s%s] %lld/%lld %s   ", static_cast<long long>(epoch + 1),
               static_cast<long long>(epochs), std::string(filled, '#').c_str(),
               std::string(width - filled, '.').c_str(), static_cast<long long>(index + 1),
               static_cast<long long>(steps), fields.c_str());
  std::fflush(stderr);
}

void ConsoleReporter::epoch(const std::string& line) {
  if (!quiet_) info(line);
}

bool parse_only() {
  const char* env = std::getenv("LARGEBATCH_PARSE_ONLY");
  return env && std::string(env) == "1";
}

CLI::Validator existing_file() {
  if (parse_only()) return CLI::Validator([](std::string&) { return std::string(); }, "FILE");
  return CLI::ExistingFile;
}

CLI::Validator existing_directory() {
  if (parse_only()) return CLI::Validator([](std::string&) { return std::string(); }, "DIR");
  return CLI::ExistingDirectory;
}

std::shared_ptr<bool> add_dry_run_flag(CLI::App* command) {
  auto flag = std::make_shared<bool>(parse_only());
  command->add_flag("--dry-run", *flag,
                    "Check the options and print the configuration as JSON (the run's config.json); run and write "
                    "nothing");
  return flag;
}

int dry_run(const char* command, const std::function<std::string()>& validated_json) {
  return run_training_command(command, [&]() -> int {
    std::printf("%s\n", validated_json().c_str());
    return 0;
  });
}

int run_training_command(const char* command, const std::function<int()>& body) {
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
  try {
    return body();
  } catch (const dist::PeerError& e) {
    std::fprintf(stderr, "largebatch %s: %s\n", command, e.what());
    return kExitPeerLost;
  } catch (const train::UsageError& e) {
    std::fprintf(stderr, "largebatch %s: %s\n", command, e.what());
    return kExitBadInput;
  } catch (const data::DataError& e) {
    std::fprintf(stderr, "largebatch %s: %s\n", command, e.what());
    return kExitBadInput;
  } catch (const std::invalid_argument& e) {
    std::fprintf(stderr, "largebatch %s: %s\n", command, e.what());
    return kExitBadInput;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "largebatch %s: error: %s\n", command, e.what());
    return 1;
  }
}

Runner add_train_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("train", "Train an image classifier with any optimizer");
  auto config = std::make_shared<train::TrainConfig>();
  auto opts = std::make_shared<std::vector<std::string>>();
  auto& c = *config;
  cmd->fallthrough();  // --config belongs to the program and may follow the subcommand

  const std::vector<std::string> optimizers = optim::recipe_names();

  cmd->add_option("--data", c.data, "Data set: " + list(data::dataset_names()))->capture_default_str();
  cmd->add_option("--data-dir", c.data_dir,
                  "Directory of the data set (default for fashion-mnist: /usr/share/datasets/fashion-mnist)");
  cmd->add_option("--augment", c.augment,
                  "auto (crop-flip for CIFAR and Tiny-ImageNet, none otherwise), none, flip, crop-flip, or paper "
                  "(crop with 4-pixel padding + flip + rotation up to 15 degrees)")->capture_default_str();
  cmd->add_flag("--drop-last,!--keep-last", c.drop_last, "Drop the last partial batch of each epoch (default: keep)");
  cmd->add_option("--loader-workers", c.loader_workers, "Threads assembling batches")->capture_default_str();
  cmd->add_option("--synthetic-size", c.synthetic_size, "Training images of --data synthetic")->capture_default_str();
  cmd->add_option("--model", c.model, "Model: " + list(models::model_names()))->capture_default_str();
  cmd->add_option("--init", c.init, "Weight initialisation of conv and linear layers: " + list(models::init_names()))
      ->capture_default_str();
  cmd->add_option("--optimizer", c.optimizer, "Optimizer or preset: " + list(optimizers))->capture_default_str();
  cmd->add_option("--opt", *opts,
                  "Optimizer option override key=value (repeatable), e.g. --opt lambda=1e-3 --opt momentum=0.95; "
                  "`largebatch optimizers` lists the keys");
  cmd->add_option("--lr", c.lr, "Base learning rate (default: the optimizer's tuned default, see README)");
  cmd->add_option("--weight-decay", c.weight_decay, "Weight decay (default: the preset's)");
  cmd->add_option("--schedule", c.schedule,
                  "auto (constant for lars/tvlars/lamb, warm-up + cosine for wa-* and LibTorch optimizers), "
                  "constant, cosine, warmup-cosine")->capture_default_str();
  cmd->add_option("--warmup-epochs", c.warmup_epochs, "Warm-up length of warmup-cosine")->capture_default_str();
  cmd->add_option("--lr-scaling", c.lr_scaling, "Peak = lr * scale(B / 256): none, linear, sqrt")->capture_default_str();
  cmd->add_option("--final-ratio", c.final_ratio, "Final learning rate of the cosine as a fraction of the peak")
      ->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size, "Global batch size B")->capture_default_str();
  cmd->add_option("--micro-batch", c.micro_batch,
                  "Accumulate gradients over micro-batches of this many images (0: whole batch at once); "
                  "BatchNorm statistics are then per micro-batch")->capture_default_str();
  cmd->add_option("--eval-batch-size", c.eval_batch_size, "Batch size of evaluation")->capture_default_str();
  cmd->add_option("--val-split", c.val_split,
                  "Hold out N training images for validation (the same N images for every seed): metrics.csv "
                  "gains val_* columns, summary.json the epoch selected on validation (0: no split)")
      ->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "Epochs")->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed of initialisation, data order and augmentation")->capture_default_str();
  cmd->add_option("--threads", c.threads, "Intra-op threads (0: all cores)")->capture_default_str();
  cmd->add_option("--device", c.device, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--out", c.out, "Output directory")->capture_default_str();
  cmd->add_option("--telemetry-every", c.telemetry_every,
                  "Write per-layer |w|, |d|, trust ratio and lr*r every N steps to telemetry.csv (0: off)")
      ->capture_default_str();
  cmd->add_option("--sharpness-every", c.sharpness_every,
                  "Every N steps, estimate the top Hessian eigenvalue of the training loss on a fixed batch (power "
                  "iteration on Hessian-vector products) into sharpness.csv (0: off)")->capture_default_str();
  cmd->add_option("--sharpness-batch", c.sharpness_batch, "Images of the fixed sharpness batch (the first ones)")
      ->capture_default_str();
  cmd->add_option("--sharpness-iterations", c.sharpness_iterations, "Most power iterations per estimate")
      ->capture_default_str();
  cmd->add_flag("--resume", c.resume, "Continue the run in --out from its last checkpoint");
  cmd->add_option("--progress", c.progress, "auto (a bar on a terminal), bar, lines, none")->capture_default_str();
  cmd->add_option("--on-nonfinite", c.on_nonfinite,
                  "A NaN or infinite loss or gradient: stop (the run ends as diverged, naming the step and layer) "
                  "or skip (the step is dropped without touching weights or optimizer state, and counted)")
      ->capture_default_str()
      ->check(CLI::IsMember({"stop", "skip"}));
  cmd->add_option("--checkpoint-every", c.checkpoint_every,
                  "Also write checkpoint.pt every N steps within epochs (0: at the end of each epoch only); a stop "
                  "request (Ctrl-C, SIGTERM) always writes one at the step it stops after")
      ->capture_default_str();
  cmd->add_option("--skip-limit", c.skip_limit,
                  "--on-nonfinite skip: this many steps skipped in a row end the run as diverged")
      ->capture_default_str();
  cmd->add_flag("--channels-last", c.channels_last,
                "Channels-last activations for the CPU convolutions: can be faster (cnn up to 1.1x), but a data-parallel run then "
                "matches the single-process one less closely");
  cmd->add_option("--cpu-kernels,--small-map-kernels", c.cpu_kernels,
                  "largebatch's CPU kernels where LibTorch 1.13's are slow: max pooling, convolutions over maps of a few "
                  "pixels (2x2, 1x1) as matrix products, BatchNorm over them as over [N*H*W, C] (the same results to "
                  "float rounding; docs/PERFORMANCE.md); false: LibTorch's kernels everywhere")
      ->capture_default_str();
  cmd->add_flag("--sync-bn", c.sync_bn,
                "Data parallel: BatchNorm statistics over the global batch (default: per rank, as DDP)");
  cmd->add_option("--dist-timeout", c.dist_timeout,
                  "Data parallel: seconds to wait for the rendezvous and for any collective before naming the rank "
                  "that stopped answering and exiting")->capture_default_str();
  cmd->add_option("--bucket-mb", c.bucket_mb,
                  "Data parallel: gradient all-reduce bucket size in MiB (smaller = more overlap with backward)")
      ->capture_default_str();
  cmd->add_flag("--plots,!--no-plots", c.plots,
                "Draw curves.png, loss.png (and trust_ratios.png) with gnuplot (default: on)");
  const auto check_only = add_dry_run_flag(cmd);

  return [cmd, config, opts, check_only]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      for (const auto& item : *opts) {
        for (const auto& kv : optim::parse_overrides(item)) config->optimizer_options[kv.first] = kv.second;
      }
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch train: --opt: %s\n", e.what());
      return kExitBadInput;
    }
    if (*check_only) {
      return dry_run("train", [&] {
        config->validate();
        return config->to_json();
      });
    }
    return run_training_command("train", [&]() -> int {
      ConsoleReporter console("train", config->progress);
      const auto summary = train::run_training(*config, &console);
      if (summary.status == "diverged") {
        std::fprintf(stderr, "largebatch train: %s\n", summary.message.c_str());
        return kExitDiverged;
      }
      if (summary.status == "interrupted") {
        std::fprintf(stderr, "largebatch train: %s\n", summary.message.c_str());
        return kExitInterrupted;
      }
      if (summary.rank != 0) return 0;  // rank 0 reports for the job
      std::printf("done: final test top-1 %.4f, best %.4f (epoch %lld), %.1f s; outputs in %s\n",
                  summary.final_test_top1, summary.best_test_top1, static_cast<long long>(summary.best_epoch),
                  summary.wall_seconds, config->out.c_str());
      return 0;
    });
  };
}

}  // namespace apps
}  // namespace largebatch
