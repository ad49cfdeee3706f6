#pragma once
// Image-classification training: the loop, evaluation, outputs, checkpoints and resume.
// Outputs in `out`: config.json, metrics.csv, summary.json, telemetry.csv (when asked), checkpoint.pt,
// model.pt, and plots (curves.png, trust_ratios.png) when gnuplot is installed.
#include <largebatch/train/reporter.h>

#include <cmath>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace largebatch {
namespace train {

// Bad user input (flags, config values, files): the program reports it in one line and exits with 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The classification loss summed over the rows: cross-entropy against targets smoothed by label_smoothing
// (1 - e on the label, e / K spread over all K classes: timm's and PyTorch's), and, for a mixed batch (mix_labels
// defined), lambda times that loss on labels plus (1 - lambda) times it on mix_labels.
torch::Tensor classification_loss_sum(const torch::Tensor& logits, const torch::Tensor& labels,
                                      const torch::Tensor& mix_labels, double mix_lambda, double label_smoothing);

struct TrainConfig {
  // data
  std::string data = "fashion-mnist";
  std::string data_dir;          // "" = the data set's default location
  std::string augment = "auto";  // auto | none | flip | crop-flip | paper (crop + flip + rotation 15 deg)
  bool drop_last = false;
  int64_t loader_workers = 2;
  int64_t synthetic_size = 2048;  // train images of --data synthetic
  // regularisation of the targets (timm's semantics: data::MixOptions)
  double label_smoothing = 0;
  double mixup = 0;               // Beta(a, a) mixup; 0: off
  double cutmix = 0;              // Beta(a, a) CutMix; 0: off
  double mixup_switch_prob = 0.5; // with both: the probability of CutMix per batch
  // model
  std::string model = "cnn";
  std::string init = "default";
  // optimizer
  std::string optimizer = "tvlars";  // a recipe (optim/recipes.h)
  std::map<std::string, std::string> optimizer_options;  // key=value overrides
  double lr = -1;                 // < 0: the recipe's classification lr at this batch size
  double weight_decay = -1;       // < 0: the preset's
  // schedule
  std::string schedule = "auto";  // auto (the preset's) | constant | cosine | warmup-cosine
  double warmup_epochs = -1;     // < 0: 5 epochs, or a quarter of the run when that is shorter
  std::string lr_scaling = "none";  // none | linear | sqrt: peak = lr * scale(B / 256)
  double final_ratio = 0.001;
  double poly_power = 2.0;        // --schedule poly
  std::string step_epochs;        // --schedule step: milestones in epochs, "30,60"
  double step_gamma = 0.1;
  double clip_grad_norm = 0;     // > 0: --clip-grad-norm
  double ema_decay = 0;           // > 0: an exponential moving average of the weights, evaluated each epoch
  std::string precision = "fp32"; // fp32 | bf16: the forward pass under bf16 autocast (train/precision.h)
  // run
  int64_t batch_size = 4096;
  int64_t micro_batch = 0;        // 0: the whole batch at once
  int64_t eval_batch_size = 2000;
  int64_t val_split = 0;          // training images held out for validation (data::hold_out); 0: none
  int64_t epochs = 20;
  uint64_t seed = 0;
  int64_t threads = 0;            // 0: all cores
  std::string device = "cpu";     // cpu | cuda | cuda:N
  std::string out = "runs/latest";
  int64_t telemetry_every = 0;    // 0: no telemetry.csv
  // Sharpness (top Hessian eigenvalue of the training loss on a fixed batch) every N steps to sharpness.csv.
  int64_t sharpness_every = 0;    // 0: off
  int64_t sharpness_batch = 1024; // the first images of the training set, unaugmented
  int64_t sharpness_iterations = 20;
  bool resume = false;
  // A checkpoint every N steps within epochs as well (0: at the end of each epoch only). A stop request
  // (Ctrl-C, SIGTERM) always writes one at the step it stops after, so a resume repeats no work.
  int64_t checkpoint_every = 0;
  std::string progress = "auto";  // auto (bar on a terminal) | bar | lines | none
  bool plots = true;
  // Data parallelism (world size and rank come from the launcher's environment, see dist/dist.h).
  bool sync_bn = false;           // BatchNorm statistics over the global batch instead of per rank
  int64_t bn_group_size = 0;      // > 0: ghost BatchNorm over groups of this many images (models.h)
  bool channels_last = false;     // NHWC activations for convolutions on the CPU (models::ClassifierImpl)
  bool cpu_kernels = true;  // largebatch's CPU kernels: max pooling, small-map convolutions and BatchNorm (models.h)
  std::string on_nonfinite = "stop";  // a NaN/Inf loss or gradient: stop (diverged, named) | skip the step
  int64_t skip_limit = 20;        // skip: this many steps skipped in a row end the run as diverged
  // Fault injection for tests (no flag, not saved): at these global steps the first gradient gets a NaN after
  // the backward pass and the all-reduce, as an overflow would leave it.
  std::vector<int64_t> inject_nonfinite_gradient_at;
  // ... and after this global step the run dies as a SIGKILL would leave it: no checkpoint, no summary
  // (run_training throws SimulatedCrash). -1: never.
  int64_t crash_after_step = -1;
  double dist_timeout = 300;      // seconds: rendezvous and every collective
  double bucket_mb = 1;           // gradient all-reduce bucket size

  // Every saved option (train/options.h lists them), under its key.
  std::string to_json() const;
  // Reads a JSON object written by to_json (unknown keys and wrong types are UsageErrors naming the key).
  static TrainConfig from_json(const std::string& text, const std::string& source);
  // Checks every option; an OptionError (train/options.h) names the first bad one by its key.
  void validate() const;
};

struct EpochRecord {
  int64_t epoch = 0;        // 1-based
  int64_t step = 0;         // optimizer steps after this epoch
  double lr = 0, phi = 1;   // at the epoch's last step
  double train_loss = 0, train_acc = 0;
  double test_loss = 0, test_top1 = 0, test_top5 = 0;
  double val_loss = NAN, val_top1 = NAN, val_top5 = NAN;  // NaN without a validation split
  double epoch_seconds = 0, images_per_second = 0, data_wait_seconds = 0;
  // Training time split: forward + backward (incl. all-reduce hidden behind it), all-reduce not hidden, optimizer.
  double compute_seconds = 0, allreduce_seconds = 0, optimizer_seconds = 0;
};

struct TrainSummary {
  std::string status;       // completed | diverged | interrupted
  std::string message;
  int64_t epochs_done = 0, steps = 0;
  double final_test_top1 = 0, best_test_top1 = 0;
  int64_t best_epoch = 0;
  // With a validation split: the epoch of the best validation top-1 (the first of equals), and its test top-1.
  int64_t selected_epoch = 0;
  double selected_val_top1 = NAN, selected_test_top1 = NAN;
  double wall_seconds = 0;
  int64_t world_size = 1;
  int64_t rank = 0;                 // of this process (only rank 0 writes files)
  int64_t replica_mismatches = 0;   // data parallel: parameter elements that differ from rank 0's at the end
  int64_t skipped_steps = 0;        // --on-nonfinite skip: steps dropped for a non-finite loss or gradient
  std::vector<EpochRecord> history;
};

// What run_training throws for TrainConfig::crash_after_step (tests only).
struct SimulatedCrash : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Runs the whole training (through the loop every command shares, src/train/run_loop.h), reporting progress to
// reporter (none: silent). Throws UsageError for bad input, data::DataError for bad data files.
TrainSummary run_training(const TrainConfig& config, Reporter* reporter = nullptr);

// The learning-rate range test (`largebatch lr-find`): from the fresh model of a TrainConfig, `steps` training steps
// with lr rising exponentially from lr_min to lr_max, the loss smoothed by an exponential average (bias-corrected),
// stopped once the smoothed loss exceeds diverge_factor times its lowest or is not finite.
struct LrFindOptions {
  double lr_min = 1e-4, lr_max = 10;
  int64_t steps = 100;
  double smoothing = 0.9;       // weight of the past in the loss average
  double diverge_factor = 4;
};
struct LrFindResult {
  std::vector<double> lr, loss, smoothed;  // per step taken
  double min_loss_lr = 0;   // where the smoothed loss was lowest
  double suggested_lr = 0;  // min_loss_lr / 10: a step below the edge of divergence
  std::string stopped;      // "range end", "diverged" (the factor) or "non-finite loss"
};
// Writes lr_find.csv (step, lr, loss, smoothed_loss), lr_find.json and lr_find.png (gnuplot) into config.out.
// One process; throws UsageError for bad input.
LrFindResult run_lr_find(const TrainConfig& config, const LrFindOptions& options, Reporter* reporter = nullptr);

// Asks a running training to stop after the current step (signal-safe: sets a flag).
void request_stop();

}  // namespace train
}  // namespace largebatch
