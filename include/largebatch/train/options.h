#pragma once
// The options of train, pretrain and linear-eval, each declared once: its key (config.json's key; the command
// line's flag is "--" + key), its help, its check, and the member holding its default. One list per command,
// composed of shared pieces (data, optimizer, run, data parallelism), drives config.json writing and reading,
// validation and the command-line flags (src/apps builds them from the same list).
//
// A list is a function visit_options(config, visitor) calling visitor(option, member, check) for each option.
#include <largebatch/train/self_supervised.h>
#include <largebatch/train/trainer.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace largebatch {
namespace train {

// A bad value of one option. what() is "<option> <problem>" ("batch-size must be > 0, got 0"). Other options a
// problem mentions are written "{key}" in it and listed in `mentioned`: what() shows them as keys, worded("--")
// as flags, for the command line ("--micro-batch 48 does not divide --batch-size 64"). Values in the text (paths)
// are never rewritten.
class OptionError : public UsageError {
 public:
  // problem: "must be > 0, got 0", or ": unknown model 'x'" (no space is put before a colon).
  OptionError(std::string option, const std::string& problem, std::vector<std::string> mentioned = {})
      : UsageError(render(option, problem, mentioned, "")),
        option_(std::move(option)),
        problem_(problem),
        mentioned_(std::move(mentioned)) {}
  const std::string& option() const { return option_; }
  const std::vector<std::string>& mentioned() const { return mentioned_; }
  // The message with every option named by prefix + key.
  std::string worded(const std::string& prefix) const { return render(option_, problem_, mentioned_, prefix); }

 private:
  static std::string render(const std::string& option, std::string problem, const std::vector<std::string>& mentioned,
                            const std::string& prefix);
  std::string option_, problem_;
  std::vector<std::string> mentioned_;
};

// How an option is named and shown.
class Option {
 public:
  Option(const char* key, std::string help) : key_(key), help_(std::move(help)) {}
  // Command-line names other than "--key", in CLI11's syntax: "--plots,!--no-plots", "--cpu-kernels,--old-name".
  Option& flags(const char* names) { flags_ = names; return *this; }
  // Part of what a run is: a resume must keep it (the saved config.json's value).
  Option& identity() { identity_ = true; return *this; }
  // A boolean given as a value (--cpu-kernels false) rather than as a flag (--sync-bn).
  Option& valued() { valued_ = true; return *this; }
  // Another key config.json files may use (an option's earlier name).
  Option& alias(const char* key) { alias_ = key; return *this; }
  // The help shows no default (one that means "decided at run time", such as lr -1).
  Option& no_default() { show_default_ = false; return *this; }
  // Not written to config.json (resume: how this invocation starts, not what the run is).
  Option& not_saved() { saved_ = false; return *this; }

  const char* key() const { return key_; }
  const std::string& help() const { return help_; }
  const char* flag_names() const { return flags_; }
  const char* alias_key() const { return alias_; }
  bool show_default() const { return show_default_; }
  bool saved() const { return saved_; }
  bool is_valued() const { return valued_; }
  bool is_identity() const { return identity_; }

 private:
  const char* key_;
  std::string help_;
  const char* flags_ = nullptr;
  const char* alias_ = nullptr;
  bool show_default_ = true;
  bool saved_ = true;
  bool valued_ = false;
  bool identity_ = false;
};

// "30,60,80" -> {30, 60, 80}; "" -> {}. std::invalid_argument unless the numbers are finite, >= 0 and increasing.
std::vector<double> parse_epoch_list(const std::string& text);

// Checks: the problem with a value ("must be > 0, got 0"), or "" when it is good.
namespace check {

// Any value (the type says enough, or a later check looks at it).
inline constexpr auto any = [](const auto&) { return std::string(); };
std::string describe(int64_t v);
std::string describe(double v);
std::string describe(const std::string& v);

inline auto at_least(int64_t low) {
  return [low](int64_t v) { return v >= low ? std::string() : "must be >= " + std::to_string(low) + ", got " + describe(v); };
}
inline auto positive() {
  return [](int64_t v) { return v > 0 ? std::string() : "must be > 0, got " + describe(v); };
}
// A finite number >= low.
inline auto finite_at_least(double low) {
  return [low](double v) {
    return std::isfinite(v) && v >= low ? std::string() : "must be finite and >= " + describe(low) + ", got " + describe(v);
  };
}
// As finite_at_least, or -1 for "the recipe's default".
inline auto default_or_at_least(double low) {
  return [low](double v) {
    return v == -1 || (std::isfinite(v) && v >= low) ? std::string()
                                                      : "must be finite and >= " + describe(low) + ", got " + describe(v);
  };
}
inline auto finite_above(double low) {
  return [low](double v) {
    return std::isfinite(v) && v > low ? std::string() : "must be finite and > " + describe(low) + ", got " + describe(v);
  };
}
// In [low, high], (low, high] or [low, high).
enum class Ends { kClosed, kOpenLow, kOpenHigh };
inline auto within(double low, double high, Ends ends = Ends::kClosed) {
  return [low, high, ends](double v) {
    const bool ok = (ends == Ends::kOpenLow ? v > low : v >= low) && (ends == Ends::kOpenHigh ? v < high : v <= high);
    return ok ? std::string()
              : "must be in " + std::string(ends == Ends::kOpenLow ? "(" : "[") + describe(low) + ", " +
                    describe(high) + (ends == Ends::kOpenHigh ? ")" : "]") + ", got " + describe(v);
  };
}
// One of a fixed list of words: ": 'x' is not a, b or c".
std::function<std::string(const std::string&)> one_of(std::vector<std::string> words);
// Names known at run time: ": unknown data set 'x' (known: ...)".
std::string data_set(const std::string& name);
std::string model(const std::string& name);
std::string model_or_empty(const std::string& name);  // "" = decided later
std::string init(const std::string& name);
std::string recipe(const std::string& name);  // optim/recipes.h
std::string device(const std::string& name);  // cpu | cuda | cuda:N
std::string not_empty(const std::string& text);
std::string epoch_list(const std::string& text);  // "" or increasing numbers >= 0: "30,60,80"

// "a, b, c": for help texts.
std::string data_set_list();
std::string model_list();
std::string init_list();

}  // namespace check

// ---- the shared pieces ------------------------------------------------------------------------------------

template <class Config, class Visitor>
void visit_data_options(Config& c, Visitor&& v) {
  v(Option("data", "Data set: " + check::data_set_list()).identity(), c.data,
    check::data_set);
  v(Option("data-dir", "Directory of the data set (default for fashion-mnist: /usr/share/datasets/fashion-mnist)")
        .no_default(),
    c.data_dir, check::any);
  v(Option("synthetic-size", "Training images of --data synthetic"), c.synthetic_size, check::positive());
}

template <class Config, class Visitor>
void visit_model_options(Config& c, Visitor&& v, const std::string& model_help) {
  v(Option("model", model_help + ": " + check::model_list()).identity(), c.model, check::model);
  v(Option("init", "Weight initialisation of conv and linear layers: " + check::init_list()),
    c.init, check::init);
}

template <class Config, class Visitor>
void visit_optimizer_options(Config& c, Visitor&& v) {
  v(Option("optimizer", "Optimizer recipe: `largebatch optimizers` lists them").identity(), c.optimizer, check::recipe);
  v(Option("opt", "Optimizer option override key=value (repeatable), e.g. --opt lambda=1e-3 --opt momentum=0.95; "
                  "`largebatch optimizers` lists the keys")
        .no_default(),
    c.optimizer_options, check::any);
  v(Option("lr", "Base learning rate (default: the recipe's for this task and batch size, `largebatch optimizers`)")
        .no_default(),
    c.lr, check::default_or_at_least(0));
  v(Option("weight-decay", "Weight decay (default: the recipe's)").no_default(), c.weight_decay,
    check::default_or_at_least(0));
  v(Option("schedule", "auto (the recipe's), constant, cosine, warmup-cosine, poly (warm-up then polynomial decay "
                       "to --final-ratio, MLPerf's LARS schedule) or step (warm-up then x --step-gamma at each of "
                       "--step-epochs)"),
    c.schedule, check::one_of({"auto", "constant", "cosine", "warmup-cosine", "poly", "step"}));
  v(Option("warmup-epochs", "Warm-up length of warmup-cosine, poly and step, in epochs of this run (train's default: 5, "
                            "or a quarter of the run when that is shorter)"),
    c.warmup_epochs, check::default_or_at_least(0));
  v(Option("final-ratio", "Final learning rate of the cosine and poly schedules as a fraction of the peak"),
    c.final_ratio, check::within(0, 1));
  v(Option("poly-power", "Exponent of the poly schedule"), c.poly_power, check::finite_above(0));
  v(Option("step-epochs", "The step schedule's milestones, in epochs of this run: e.g. 30,60,80"), c.step_epochs,
    check::epoch_list);
  v(Option("step-gamma", "The step schedule's factor at each milestone"), c.step_gamma,
    check::within(0, 1, check::Ends::kOpenLow));
  v(Option("clip-grad-norm", "Clip the global gradient norm to N before every step, for any optimizer (after the "
                             "data-parallel average and micro-batch accumulation; 0: off); metrics.csv gains the "
                             "norm, summary.json the clipped steps"),
    c.clip_grad_norm, check::finite_at_least(0));
}

// epochs, seed, threads, device, out and the loop's resume, checkpoint and progress options.
template <class Config, class Visitor>
void visit_run_options(Config& c, Visitor&& v) {
  v(Option("epochs", "Epochs"), c.epochs, check::positive());
  v(Option("seed", "Seed of initialisation, data order and augmentation").identity(), c.seed, check::any);
  v(Option("threads", "Intra-op threads (0: all cores)"), c.threads, check::at_least(0));
  v(Option("device", "cpu or cuda[:N]"), c.device, check::device);
  v(Option("out", "Output directory"), c.out, check::not_empty);
  v(Option("checkpoint-every", "Also write checkpoint.pt every N steps within epochs (0: at the end of each epoch "
                               "only); a stop request (Ctrl-C, SIGTERM) always writes one at the step it stops after"),
    c.checkpoint_every, check::at_least(0));
  v(Option("on-nonfinite", "A NaN or infinite loss or gradient: stop (the run ends as diverged, naming the step and "
                           "layer) or skip (the step is dropped without touching weights or optimizer state, and "
                           "counted)"),
    c.on_nonfinite, check::one_of({"stop", "skip"}));
  v(Option("skip-limit", "--on-nonfinite skip: this many steps skipped in a row end the run as diverged"),
    c.skip_limit, check::at_least(1));
  v(Option("resume", "Continue the run in --out from its last checkpoint").flags("--resume").not_saved(), c.resume,
    check::any);
  v(Option("progress", "auto (a bar on a terminal), bar, lines, none"), c.progress,
    check::one_of({"auto", "bar", "lines", "none"}));
  v(Option("plots", "Draw the run's plots with gnuplot (default: on)").flags("--plots,!--no-plots"), c.plots,
    check::any);
}

template <class Config, class Visitor>
void visit_dist_options(Config& c, Visitor&& v) {
  v(Option("sync-bn", "Data parallel: BatchNorm statistics over the global batch (default: per rank, as DDP)")
        .flags("--sync-bn"),
    c.sync_bn, check::any);
  v(Option("dist-timeout", "Data parallel: seconds to wait for the rendezvous and for any collective before naming "
                           "the rank that stopped answering and exiting"),
    c.dist_timeout, check::finite_above(0));
  v(Option("bucket-mb", "Data parallel: gradient all-reduce bucket size in MiB (smaller = more overlap with "
                        "backward)"),
    c.bucket_mb, check::finite_above(0));
}

// ---- the three commands -----------------------------------------------------------------------------------

template <class Visitor>
void visit_options(TrainConfig& c, Visitor&& v) {
  visit_data_options(c, v);
  v(Option("augment", "auto (crop-flip for CIFAR and Tiny-ImageNet, none otherwise), none, flip, crop-flip, or "
                      "paper (crop with 4-pixel padding + flip + rotation up to 15 degrees)"),
    c.augment, check::one_of({"auto", "none", "flip", "crop-flip", "paper"}));
  v(Option("drop-last", "Drop the last partial batch of each epoch (default: keep)").flags("--drop-last,!--keep-last"),
    c.drop_last, check::any);
  v(Option("loader-workers", "Threads assembling batches"), c.loader_workers, check::positive());
  v(Option("label-smoothing", "Label smoothing e of the training loss: 1 - e on the label, e / K on every class "
                              "(timm's --smoothing)").alias("smoothing"),
    c.label_smoothing, check::within(0, 1, check::Ends::kOpenHigh));
  v(Option("mixup", "Mixup: every batch blends each image with its partner, lambda ~ Beta(A, A) (timm's --mixup; "
                    "0: off)"),
    c.mixup, check::finite_at_least(0));
  v(Option("cutmix", "CutMix: every batch pastes a box of each image's partner, lambda ~ Beta(A, A) (timm's "
                     "--cutmix; 0: off)"),
    c.cutmix, check::finite_at_least(0));
  v(Option("mixup-switch-prob", "With --mixup and --cutmix both set: the probability that a batch is CutMix"),
    c.mixup_switch_prob, check::within(0, 1));
  visit_model_options(c, v, "Model");
  visit_optimizer_options(c, v);
  v(Option("bn-group-size", "Ghost BatchNorm: statistics over groups of G images of each rank's (micro-)batch, "
                            "MLPerf's BN span (0: the whole batch); not with --sync-bn"),
    c.bn_group_size, check::at_least(0));
  v(Option("precision", "fp32, or bf16: the forward pass under bfloat16 autocast, with float32 weights, gradients and "
                        "optimizer state (docs/TRAINING.md)"),
    c.precision, check::one_of({"fp32", "bf16"}));
  v(Option("ema-decay", "Keep an exponential moving average of the weights and BatchNorm buffers (timm's "
                        "--model-ema-decay: e = D e + (1 - D) w after every step), evaluated each epoch beside the "
                        "weights (metrics.csv's ema_* columns) and saved as model_ema.pt (0: off)"),
    c.ema_decay, check::within(0, 1, check::Ends::kOpenHigh));
  v(Option("lr-scaling", "Peak = lr * scale(B / 256): none, linear, sqrt"), c.lr_scaling,
    check::one_of({"none", "linear", "sqrt"}));
  v(Option("batch-size", "Global batch size B").identity(), c.batch_size, check::positive());
  v(Option("micro-batch", "Accumulate gradients over micro-batches of this many images (0: the whole batch at "
                          "once); BatchNorm statistics are then per micro-batch"),
    c.micro_batch, check::at_least(0));
  v(Option("eval-batch-size", "Batch size of evaluation"), c.eval_batch_size, check::positive());
  v(Option("val-split", "Hold out N training images for validation (the same N images for every seed): metrics.csv "
                        "gains val_* columns, summary.json the epoch selected on validation (0: no split)").identity(),
    c.val_split, check::at_least(0));
  visit_run_options(c, v);
  v(Option("telemetry-every", "Write per-layer |w|, |d|, trust ratio and lr*r every N steps to telemetry.csv (0: off)"),
    c.telemetry_every, check::at_least(0));
  v(Option("sharpness-every", "Every N steps, estimate the top Hessian eigenvalue of the training loss on a fixed "
                              "batch (power iteration on Hessian-vector products) into sharpness.csv (0: off)"),
    c.sharpness_every, check::at_least(0));
  v(Option("sharpness-batch", "Images of the fixed sharpness batch (the first ones)"), c.sharpness_batch,
    check::positive());
  v(Option("sharpness-iterations", "Most power iterations per estimate"), c.sharpness_iterations, check::positive());
  v(Option("channels-last", "Channels-last activations for the CPU convolutions: can be faster, but a data-parallel "
                            "run then matches the single-process one less closely")
        .flags("--channels-last"),
    c.channels_last, check::any);
  v(Option("cpu-kernels", "largebatch's CPU kernels where LibTorch 1.13's are slow: max pooling, convolutions over "
                          "maps of a few pixels (2x2, 1x1) as matrix products, BatchNorm over them as over [N*H*W, C] "
                          "and BatchNorm's training forward pass over other maps, the cnn's first "
                          "convolution fused with its pooling (LARGEBATCH_FUSED_FIRST_LAYER=0: not that one), "
                          "3x3 convolutions of 32+ to 64+ channels by oneDNN's Winograd kernels where the CPU has them "
                          "(LARGEBATCH_WINOGRAD=0: not those) (the same results to float rounding; docs/PERFORMANCE.md); false: LibTorch's kernels "
                          "everywhere")
        .flags("--cpu-kernels,--small-map-kernels")
        .valued()
        .alias("small-map-kernels"),
    c.cpu_kernels, check::any);
  visit_dist_options(c, v);
}

template <class Visitor>
void visit_options(PretrainConfig& c, Visitor&& v) {
  visit_data_options(c, v);
  v(Option("loader-workers", "Threads assembling batches"), c.loader_workers, check::positive());
  visit_model_options(c, v, "Backbone (a zoo model without its classifier head)");
  v(Option("projector", "Projector layer sizes (Linear-BN-ReLU ..., last Linear); the paper uses 8192-8192-8192 on "
                        "ResNet-50 (4096s in the TVLARS paper)")
        .identity(),
    c.projector, check::any);  // parse_projector checks it
  v(Option("lambda", "Weight lambda_BT of the off-diagonal term"), c.lambda, check::finite_at_least(0));
  v(Option("min-scale", "Smallest area fraction of the random resized crop"), c.min_scale, check::within(0, 1, check::Ends::kOpenLow));
  visit_optimizer_options(c, v);
  v(Option("precision", "fp32, or bf16: both views' forward pass under bfloat16 autocast, the loss and everything "
                        "the optimizer holds in float32 (docs/TRAINING.md)"),
    c.precision, check::one_of({"fp32", "bf16"}));
  v(Option("batch-size", "Global batch size (>= 2: Barlow Twins normalises over the batch)").identity(), c.batch_size,
    check::at_least(2));
  visit_run_options(c, v);
  v(Option("telemetry-every", "Per-layer telemetry every N steps to telemetry.csv (0: off)"), c.telemetry_every,
    check::at_least(0));
  visit_dist_options(c, v);
}

template <class Visitor>
void visit_options(LinearEvalConfig& c, Visitor&& v) {
  v(Option("backbone", "backbone.pt of `pretrain`, model.pt of `train`, or `random` (with --model, --init, --seed)")
        .no_default()
        .identity(),
    c.backbone, check::any);  // validate() checks it
  visit_data_options(c, v);
  v(Option("model", "Backbone model (default: the backbone run's config.json)").no_default(), c.model,
    check::model_or_empty);
  v(Option("init", "Initialisation of --backbone random"), c.init, check::init);
  v(Option("augment", "Training images: none (features computed once), flip, crop-flip; test images never"), c.augment,
    check::one_of({"none", "flip", "crop-flip"}));
  v(Option("standardize", "Standardise features with the training set's per-dimension mean and std (default: on)")
        .flags("--standardize,!--no-standardize"),
    c.standardize, check::any);
  v(Option("lr", "SGD learning rate (cosine to 0, stepped per epoch)"), c.lr, check::finite_above(0));
  v(Option("momentum", "SGD momentum"), c.momentum, check::within(0, 1, check::Ends::kOpenHigh));
  v(Option("weight-decay", "Weight decay of the head"), c.weight_decay, check::finite_at_least(0));
  v(Option("batch-size", "Batch size of the head's training").identity(), c.batch_size, check::positive());
  v(Option("micro-batch", "Accumulate gradients over micro-batches of this many images (0: the whole batch)"),
    c.micro_batch, check::at_least(0));
  v(Option("eval-batch-size", "Batch size of feature extraction"), c.eval_batch_size, check::positive());
  v(Option("val-split", "Hold out N training images for validation (as train): val_* columns in metrics.csv").identity(),
    c.val_split, check::at_least(0));
  visit_run_options(c, v);
}

// Runs every option's check; OptionError for the first that fails.
struct OptionChecker {
  template <class T, class Check>
  void operator()(const Option& option, const T& value, Check&& check_value) const {
    const std::string problem = check_value(value);
    if (!problem.empty()) throw OptionError(option.key(), problem);
  }
};

}  // namespace train
}  // namespace largebatch
