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
  auto opts = std::make_shared<std::vector<std::string>>();
  auto& c = *config;
  cmd->fallthrough();
  cmd->add_option("--data", c.data, "Data set (labels unused)")->capture_default_str();
  cmd->add_option("--data-dir", c.data_dir, "Directory of the data set");
  cmd->add_option("--loader-workers", c.loader_workers, "Threads assembling batches")->capture_default_str();
  cmd->add_option("--synthetic-size", c.synthetic_size, "Training images of --data synthetic")->capture_default_str();
  cmd->add_option("--model", c.model, "Backbone: a zoo model without its classifier head")->capture_default_str();
  cmd->add_option("--init", c.init, "Weight initialisation of the backbone")->capture_default_str();
  cmd->add_option("--projector", c.projector,
                  "Projector layer sizes (Linear-BN-ReLU ..., last Linear); the paper uses 8192-8192-8192 on "
                  "ResNet-50 (4096s in the TVLARS paper)")->capture_default_str();
  cmd->add_option("--lambda", c.lambda, "Weight lambda_BT of the off-diagonal term")->capture_default_str();
  cmd->add_option("--min-scale", c.min_scale, "Smallest area fraction of the random resized crop")->capture_default_str();
  cmd->add_option("--optimizer", c.optimizer, "Optimizer or preset (as `train`)")->capture_default_str();
  cmd->add_option("--opt", *opts, "Optimizer option override key=value (repeatable)");
  cmd->add_option("--lr", c.lr, "Base learning rate (default: LAMB 0.01, LARS/TVLARS 0.2, SGD 0.05 sqrt(B/256), Adam 1e-3)");
  cmd->add_option("--weight-decay", c.weight_decay, "Weight decay (default: the preset's)");
  cmd->add_option("--schedule", c.schedule,
                  "auto (constant for lars/tvlars/lamb, warm-up + cosine for wa-* and LibTorch optimizers), constant, "
                  "cosine, warmup-cosine")->capture_default_str();
  cmd->add_option("--warmup-epochs", c.warmup_epochs, "Warm-up length in epochs of this run")->capture_default_str();
  cmd->add_option("--final-ratio", c.final_ratio, "Final lr of the cosine as a fraction of the peak")->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size, "Global batch size")->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "Epochs")->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed of initialisation, data order and views")->capture_default_str();
  cmd->add_option("--threads", c.threads, "Intra-op threads (0: all cores)")->capture_default_str();
  cmd->add_option("--device", c.device, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--out", c.out, "Output directory")->capture_default_str();
  cmd->add_option("--telemetry-every", c.telemetry_every, "Per-layer telemetry every N steps (0: off)")->capture_default_str();
  cmd->add_option("--checkpoint-every", c.checkpoint_every,
                  "Also write checkpoint.pt every N steps within epochs (0: at the end of each epoch only); a stop "
                  "request (Ctrl-C, SIGTERM) always writes one at the step it stops after")
      ->capture_default_str();
  cmd->add_flag("--resume", c.resume, "Continue the run in --out from its last checkpoint");
  cmd->add_option("--progress", c.progress, "auto, bar, lines, none")->capture_default_str();
  cmd->add_flag("--sync-bn", c.sync_bn, "Data parallel: BatchNorm statistics over the global batch");
  cmd->add_option("--dist-timeout", c.dist_timeout, "Data parallel: seconds before a silent rank is named")->capture_default_str();
  cmd->add_option("--bucket-mb", c.bucket_mb, "Data parallel: gradient bucket size in MiB")->capture_default_str();
  cmd->add_flag("--plots,!--no-plots", c.plots, "Draw loss.png (and trust_ratios.png) with gnuplot");

  const auto check_only = add_dry_run_flag(cmd);

  return [cmd, config, opts, check_only]() -> int {
    if (!cmd->parsed()) return -1;
    try {
      for (const auto& item : *opts)
        for (const auto& kv : optim::parse_overrides(item)) config->optimizer_options[kv.first] = kv.second;
    } catch (const std::invalid_argument& e) {
      std::fprintf(stderr, "largebatch pretrain: --opt: %s\n", e.what());
      return kExitBadInput;
    }
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
  auto& c = *config;
  cmd->fallthrough();
  cmd->add_option("--backbone", c.backbone,
                  "backbone.pt of `pretrain`, model.pt of `train`, or `random` (with --model, --init, --seed)");
  cmd->add_option("--data", c.data, "Data set")->capture_default_str();
  cmd->add_option("--data-dir", c.data_dir, "Directory of the data set");
  cmd->add_option("--synthetic-size", c.synthetic_size, "Training images of --data synthetic")->capture_default_str();
  cmd->add_option("--model", c.model, "Backbone model (default: the backbone run's config.json)");
  cmd->add_option("--init", c.init, "Initialisation of --backbone random")->capture_default_str();
  cmd->add_option("--augment", c.augment,
                  "Training images: none (features computed once), flip, crop-flip; test images never")
      ->capture_default_str();
  cmd->add_flag("--standardize,!--no-standardize", c.standardize,
                "Standardise features with the training set's per-dimension mean and std (default: on)");
  cmd->add_option("--lr", c.lr, "SGD learning rate (cosine to 0, stepped per epoch)")->capture_default_str();
  cmd->add_option("--momentum", c.momentum, "SGD momentum")->capture_default_str();
  cmd->add_option("--weight-decay", c.weight_decay, "Weight decay of the head")->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size, "Batch size of the head's training")->capture_default_str();
  cmd->add_option("--eval-batch-size", c.eval_batch_size, "Batch size of feature extraction")->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "Epochs")->capture_default_str();
  cmd->add_option("--seed", c.seed, "Seed of the head, data order (and --backbone random)")->capture_default_str();
  cmd->add_option("--threads", c.threads, "Intra-op threads (0: all cores)")->capture_default_str();
  cmd->add_option("--device", c.device, "cpu or cuda[:N]")->capture_default_str();
  cmd->add_option("--out", c.out, "Output directory")->capture_default_str();
  cmd->add_flag("--resume", c.resume, "Continue the run in --out from its last checkpoint");
  cmd->add_option("--progress", c.progress, "auto, bar, lines, none")->capture_default_str();
  cmd->add_flag("--plots,!--no-plots", c.plots, "Draw curves.png and loss.png with gnuplot");

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
