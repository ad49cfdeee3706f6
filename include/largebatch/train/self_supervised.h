#pragma once
// Self-supervised pre-training with Barlow Twins, and linear evaluation of a frozen backbone.
//
// `largebatch pretrain` trains a zoo model's feature extractor (its classifier head is left out) followed by
// a projector MLP on the Barlow Twins loss of two augmented views (train/barlow_twins.h), with any optimizer
// and schedule, data-parallel like `train`. Outputs in `out`: config.json, metrics.csv (per epoch: lr, phi,
// loss and its on- / off-diagonal terms, timings), summary.json, telemetry.csv (when asked), checkpoint.pt,
// backbone.pt (the classifier module with an untrained head; `linear-eval --backbone` reads it), plots.
//
// `largebatch linear-eval` freezes a backbone in eval mode, standardises its features with the training set's
// per-dimension mean and standard deviation (a BatchNorm without affine parameters, as in MAE's linear probe,
// so a random backbone's unscaled features get a fair chance), and trains a linear head with SGD (momentum
// 0.9, lr 0.3, weight decay, cosine stepped per epoch). Test images get no augmentation; top-1 and top-5 on
// the full test set. Outputs as `train`: config.json, metrics.csv, summary.json, checkpoint.pt, head.pt, plots.
#include <largebatch/train/trainer.h>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace largebatch {
namespace train {

struct PretrainConfig {
  // data (labels are not used)
  std::string data = "fashion-mnist";
  std::string data_dir;
  int64_t loader_workers = 2;
  int64_t synthetic_size = 2048;
  // model
  std::string model = "cnn";
  std::string init = "default";
  std::string projector = "1024-1024-1024";  // output sizes of the projector's linear layers
  double lambda = 0.005;                      // weight of the off-diagonal term (lambda_BT)
  double min_scale = 0.08;                    // of the random resized crop
  // optimizer and schedule (as `train`)
  std::string optimizer = "lamb";
  std::map<std::string, std::string> optimizer_options;
  double lr = -1;                 // < 0: the recipe's self-supervised lr at this batch size (optim/recipes.h)
  double weight_decay = -1;       // < 0: the preset's
  std::string schedule = "auto";  // auto: warm-up + cosine, except constant for lars / tvlars / lamb ... as train
  double warmup_epochs = 2;       // of this run's epochs
  double final_ratio = 0.001;
  double poly_power = 2.0;        // --schedule poly
  std::string step_epochs;        // --schedule step: milestones in epochs, "30,60"
  double step_gamma = 0.1;
  double clip_grad_norm = 0;     // > 0: --clip-grad-norm
  std::string precision = "fp32"; // fp32 | bf16: both views' forward pass under bf16 autocast (train/precision.h)
  // run
  int64_t batch_size = 1024;
  int64_t epochs = 10;
  uint64_t seed = 0;
  int64_t threads = 0;
  std::string device = "cpu";
  std::string out = "runs/pretrain";
  int64_t telemetry_every = 0;
  int64_t checkpoint_every = 0;   // as TrainConfig: also within epochs; a stop request always writes one
  std::string on_nonfinite = "stop";  // as TrainConfig: stop | skip
  int64_t skip_limit = 20;
  std::vector<int64_t> inject_nonfinite_gradient_at;  // tests only (no flag, not saved): as TrainConfig
  int64_t crash_after_step = -1;  // tests only (no flag, not saved): as TrainConfig
  bool resume = false;
  std::string progress = "auto";
  bool plots = true;
  bool sync_bn = false;
  double dist_timeout = 300;
  double bucket_mb = 1;

  std::string to_json() const;
  static PretrainConfig from_json(const std::string& text, const std::string& source);
  void validate() const;
};


struct PretrainRecord {
  int64_t epoch = 0, step = 0;
  double lr = 0, phi = 1;
  double train_loss = 0, on_diagonal = 0, off_diagonal = 0;  // means over the epoch's steps (off not weighted)
  double epoch_seconds = 0, images_per_second = 0, data_wait_seconds = 0;
  double compute_seconds = 0, allreduce_seconds = 0, optimizer_seconds = 0;
};

struct PretrainSummary {
  std::string status;  // completed | diverged | interrupted
  std::string message;
  int64_t epochs_done = 0, steps = 0;
  double final_loss = 0;
  double wall_seconds = 0;
  int64_t world_size = 1, rank = 0, replica_mismatches = 0;
  int64_t skipped_steps = 0;  // --on-nonfinite skip
  std::vector<PretrainRecord> history;
};

// "1024-1024-1024" as layer sizes; OptionError("projector") unless each is 1..65536.
std::vector<int64_t> parse_projector(const std::string& text);

PretrainSummary run_pretraining(const PretrainConfig& config, Reporter* reporter = nullptr);

struct LinearEvalConfig {
  std::string backbone;           // backbone.pt of `pretrain`, model.pt of `train`, or "random"
  std::string data = "fashion-mnist";
  std::string data_dir;
  int64_t synthetic_size = 2048;
  std::string model;              // "" = the backbone run's config.json; required with --backbone random
  std::string init = "default";   // of --backbone random
  std::string augment = "none";   // training images: none (features computed once), flip, crop-flip
  bool standardize = true;
  double lr = 0.3;
  double momentum = 0.9;
  double weight_decay = 5e-4;    // the paper's linear evaluation (Barlow Twins itself used 1e-6)
  int64_t batch_size = 256;
  int64_t micro_batch = 0;        // as TrainConfig (the probe has no BatchNorm: the same gradient)
  int64_t eval_batch_size = 2000;
  int64_t val_split = 0;          // as TrainConfig: training images held out, evaluated each epoch
  int64_t epochs = 100;
  uint64_t seed = 0;
  int64_t threads = 0;
  std::string device = "cpu";
  std::string out = "runs/linear-eval";
  int64_t checkpoint_every = 0;   // as TrainConfig
  std::string on_nonfinite = "stop";
  int64_t skip_limit = 20;
  std::vector<int64_t> inject_nonfinite_gradient_at;  // tests only (no flag, not saved)
  int64_t crash_after_step = -1;                      // tests only (no flag, not saved)
  bool resume = false;
  std::string progress = "auto";
  bool plots = true;

  std::string to_json() const;
  static LinearEvalConfig from_json(const std::string& text, const std::string& source);
  void validate() const;
};

// The summary's optimizer field is "sgd (linear head)"; history rows are metrics.csv's.
TrainSummary run_linear_eval(const LinearEvalConfig& config, Reporter* reporter = nullptr);

}  // namespace train
}  // namespace largebatch
