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
  } catch (const train::OptionError& e) {  // named by its flag
    std::fprintf(stderr, "largebatch %s: %s\n", command, e.worded("--").c_str());
    return kExitBadInput;
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
  cmd->fallthrough();  // --config belongs to the program and may follow the subcommand
  add_flags(cmd, *config);
  const auto check_only = add_dry_run_flag(cmd);

  return [cmd, config, check_only]() -> int {
    if (!cmd->parsed()) return -1;
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

Runner add_lr_find_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("lr-find", "The learning-rate range test: lr rising exponentially over --steps steps "
                                            "from a fresh model, the loss smoothed, stopped when it diverges");
  auto config = std::make_shared<train::TrainConfig>();
  auto options = std::make_shared<train::LrFindOptions>();
  config->out = "runs/lr-find";
  cmd->fallthrough();
  add_flags(cmd, *config);  // every train option: model, data, optimizer, batch size, ...
  cmd->add_option("--lr-min", options->lr_min, "First learning rate")->capture_default_str();
  cmd->add_option("--lr-max", options->lr_max, "Last learning rate")->capture_default_str();
  cmd->add_option("--steps", options->steps, "Steps of the test")->capture_default_str();
  cmd->add_option("--smooth-beta", options->smoothing, "Weight of the past in the smoothed loss")->capture_default_str();
  cmd->add_option("--diverge-factor", options->diverge_factor,
                  "Stop once the smoothed loss exceeds this many times its lowest")
      ->capture_default_str();
  return [cmd, config, options]() -> int {
    if (!cmd->parsed()) return -1;
    return run_training_command("lr-find", [&]() -> int {
      ConsoleReporter console("lr-find", config->progress);
      const auto r = train::run_lr_find(*config, *options, &console);
      std::printf("lowest smoothed loss at lr %.4g (%s after %zu steps); suggested lr %.4g (a tenth of it); "
                  "%s/lr_find.csv, lr_find.png\n",
                  r.min_loss_lr, r.stopped.c_str(), r.lr.size(), r.suggested_lr, config->out.c_str());
      return 0;
    });
  };
}

}  // namespace apps
}  // namespace largebatch
