// `largebatch pretrain` (Barlow Twins) and `largebatch linear-eval`: every option is a flag and a key of a
// JSON or TOML config file (--config).
#include "commands.h"

#include <filesystem>

#include <largebatch/data/dataset.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/train/self_supervised.h>

#include <cstdio>

namespace largebatch {
namespace apps {

Runner add_pretrain_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("pretrain", "Self-supervised pre-training of a backbone with Barlow Twins");
  auto config = std::make_shared<train::PretrainConfig>();
  cmd->fallthrough();
  add_flags(cmd, *config);

  const auto check_only = add_dry_run_flag(cmd);

  return [cmd, config, check_only]() -> int {
    if (!cmd->parsed()) return -1;
    if (*check_only) {
      return dry_run("pretrain", [&] {
        config->validate();
        return config->to_json();
      });
    }
    return run_training_command("pretrain", [&]() -> int {
      ConsoleReporter console("pretrain", config->progress);
      const auto summary = train::run_pretraining(*config, &console);
      if (summary.status != "completed") {
        std::fprintf(stderr, "largebatch pretrain: %s\n", summary.message.c_str());
        return summary.status == "diverged" ? kExitDiverged : kExitInterrupted;
      }
      if (summary.rank == 0)
        std::printf("done: final loss %.3f, %.1f s; backbone in %s/backbone.pt\n", summary.final_loss,
                    summary.wall_seconds, config->out.c_str());
      return 0;
    });
  };
}

Runner add_linear_eval_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("linear-eval", "Linear evaluation of a frozen backbone (pre-trained or random)");
  auto config = std::make_shared<train::LinearEvalConfig>();
  cmd->fallthrough();
  add_flags(cmd, *config);

  const auto check_only = add_dry_run_flag(cmd);

  return [cmd, config, check_only]() -> int {
    if (!cmd->parsed()) return -1;
    if (*check_only) {
      return dry_run("linear-eval", [&] {
        train::LinearEvalConfig checked = *config;
        // Checking a written command: its backbone may be what an earlier command would write.
        if (parse_only() && checked.backbone != "random" && !std::filesystem::exists(checked.backbone)) {
          checked.backbone = "random";
          if (checked.model.empty()) checked.model = "cnn";
        }
        checked.validate();
        return config->to_json();
      });
    }
    return run_training_command("linear-eval", [&]() -> int {
      ConsoleReporter console("linear-eval", config->progress);
      const auto summary = train::run_linear_eval(*config, &console);
      if (summary.status != "completed") {
        std::fprintf(stderr, "largebatch linear-eval: %s\n", summary.message.c_str());
        return summary.status == "diverged" ? kExitDiverged : kExitInterrupted;
      }
      std::printf("done: final test top-1 %.4f (top-5 %.4f), best %.4f (epoch %lld), %.1f s; outputs in %s\n",
                  summary.final_test_top1, summary.history.back().test_top5, summary.best_test_top1,
                  static_cast<long long>(summary.best_epoch), summary.wall_seconds, config->out.c_str());
      return 0;
    });
  };
}

}  // namespace apps
}  // namespace largebatch
