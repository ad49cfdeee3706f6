#pragma once
// The one training loop of train, pretrain and linear-eval, and the Task interface through which each says
// what differs. The loop owns everything they share: the output directory and resume, checkpoints, data
// parallelism (ranks, gradient averaging, agreement on stopping), the optimizer and its schedule, micro-batches,
// the non-finite policy, telemetry, sharpness, phase timings, metrics.csv and summary.json. A task owns its data,
// network, loss, evaluation and artifacts. Internal to the library (src/train).
#include <largebatch/data/pipeline.h>
#include <largebatch/optim/schedule.h>
#include <largebatch/train/options.h>
#include <largebatch/train/reporter.h>

#include "run_support.h"

#include <algorithm>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace largebatch {
namespace train {
namespace detail {

// The options of the loop itself, taken from a command's config by the task.
struct LoopOptions {
  std::string command;          // "train", "pretrain", "linear-eval": in messages
  std::filesystem::path out;
  bool resume = false;
  int64_t epochs = 1;
  int64_t batch_size = 1;       // global
  int64_t micro_batch = 0;      // 0: the whole (per-rank) batch at once
  uint64_t seed = 0;
  int64_t threads = 0;
  std::string device = "cpu";
  int64_t checkpoint_every = 0;
  int64_t telemetry_every = 0;
  int64_t sharpness_every = 0, sharpness_iterations = 20;
  double clip_grad_norm = 0;    // > 0: the global gradient norm clipped to it before every step
  double ema_decay = 0;         // > 0: an average of the weights (train::WeightAverage), evaluated each epoch
  std::string on_nonfinite = "stop";
  int64_t skip_limit = 20;
  bool plots = true;
  bool sync_bn = false;
  double dist_timeout = 300, bucket_mb = 1;
  std::vector<int64_t> inject_nonfinite_gradient_at;  // tests only, as TrainConfig's
  int64_t crash_after_step = -1;                      // tests only, as TrainConfig's
};

// Where the run is: which process, on which device.
struct RunPlace {
  torch::Device device = torch::kCPU;
  int64_t rank = 0, world = 1;
  bool lead = true;  // rank 0: writes files and reports
};

// The loop options every command has (the configs share these members); a task adds its own.
template <class Config>
LoopOptions common_loop_options(const Config& c, const char* command) {
  LoopOptions o;
  o.command = command;
  o.out = c.out;
  o.resume = c.resume;
  o.epochs = c.epochs;
  o.batch_size = c.batch_size;
  o.seed = c.seed;
  o.threads = c.threads;
  o.device = c.device;
  o.checkpoint_every = c.checkpoint_every;
  o.on_nonfinite = c.on_nonfinite;
  o.skip_limit = c.skip_limit;
  o.plots = c.plots;
  o.inject_nonfinite_gradient_at = c.inject_nonfinite_gradient_at;
  o.crash_after_step = c.crash_after_step;
  return o;
}

// The warm-up a run uses: the given epochs, or (given < 0) 5 epochs, at most a quarter of the run.
inline double warmup_epochs_of(double given, int64_t epochs) {
  return given >= 0 ? given : std::min(5.0, static_cast<double>(epochs) / 4.0);
}

// The schedule options of train and pretrain (their configs share these members), in this run's steps.
template <class Config>
optim::ScheduleOptions schedule_options(const Config& c, int64_t steps_per_epoch, int64_t total_steps) {
  optim::ScheduleOptions so;
  const auto steps = [&](double epochs) { return std::llround(epochs * static_cast<double>(steps_per_epoch)); };
  so.warmup_steps = steps(warmup_epochs_of(c.warmup_epochs, c.epochs));
  so.total_steps = total_steps;
  so.final_ratio = c.final_ratio;
  so.poly_power = c.poly_power;
  so.step_gamma = c.step_gamma;
  for (double e : parse_epoch_list(c.step_epochs)) {
    const int64_t at = steps(e);
    if (so.milestones.empty() || at > so.milestones.back()) so.milestones.push_back(at);  // epochs that round alike
  }
  return so;
}

// Refuses a warm-up longer than the run for a schedule that has one, and a step schedule without milestones.
void check_schedule(const std::string& schedule, const std::string& optimizer, double warmup_epochs, int64_t epochs,
                    const std::string& step_epochs);

// An epoch's batches. Batches must depend only on (seed, epoch, index), so that an epoch restarted at a batch
// continues as it would have, and set index, global_size (the images of the step over all ranks) and offset.
class BatchSource {
 public:
  virtual ~BatchSource() = default;
  virtual int64_t batches_per_epoch() const = 0;
  virtual void start_epoch(int64_t epoch, int64_t first_batch) = 0;
  virtual bool next(data::Batch& batch) = 0;
  virtual double wait_seconds() const { return 0; }
};

// A data::BatchLoader as a BatchSource.
class LoaderSource : public BatchSource {
 public:
  LoaderSource(const data::ImageDataset& set, const data::LoaderOptions& options) : loader_(set, options) {}
  int64_t batches_per_epoch() const override { return loader_.batches_per_epoch(); }
  void start_epoch(int64_t epoch, int64_t first_batch) override { loader_.start_epoch(epoch, first_batch); }
  bool next(data::Batch& batch) override { return loader_.next(batch); }
  double wait_seconds() const override { return loader_.wait_seconds(); }

 private:
  data::BatchLoader loader_;
};

// The optimizer of a run and how its learning rate moves.
struct OptimizerPlan {
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  std::function<double(int64_t step)> lr_at;
  double lr = 0;               // the base learning rate, as config.json records it
  std::string description;     // for the banner: "tvlars:paper lr 0.01 (constant schedule)"
  nlohmann::json resolved;     // summary.json's optimizer_resolved ({} when the task has no recipe)
};
// The plan of a recipe (optim/recipes.h): the factory's optimizer and the LrSchedule of schedule options.
OptimizerPlan plan_from_recipe(const optim::ResolvedRecipe& recipe, const optim::NamedParameters& parameters,
                               int64_t batch_size, optim::ScheduleOptions schedule);

// An epoch in progress: the sums of the task's step metrics over the steps taken, and the phase timings.
struct EpochState {
  int64_t index = 0;                 // batches of the epoch done (taken or skipped)
  std::vector<double> sums;          // of Task::forward_backward's metrics, over steps taken
  int64_t steps_done = 0, seen = 0;  // steps taken and their (global) images
  double lr = 0, phi = 1;
  double prepare_s = 0, compute_s = 0, allreduce_s = 0, optimizer_s = 0, sharpness_s = 0;
  double elapsed_s = 0;              // since the epoch began, when it was last saved
  // --clip-grad-norm: the global norms before clipping, over steps taken, and the steps it clipped.
  double grad_norm_sum = 0, grad_norm_max = 0;
  int64_t clipped_steps = 0;
  nlohmann::json to_json() const;
  // earlier_keys: the sums' keys in checkpoints of earlier versions (Task::earlier_sum_keys).
  static EpochState from_json(const nlohmann::json& j, size_t metrics, const std::vector<std::string>& earlier_keys);
};

// What a checkpoint's meta record holds besides weights and optimizer state: where the run is, its non-finite
// counters, the finished epochs' records and, for a checkpoint within an epoch, that epoch's state.
struct RunState {
  int64_t epoch = 0;  // the next epoch to run, or the unfinished one of `within`
  int64_t step = 0;
  int64_t skipped_steps = 0, skipped_in_a_row = 0;  // --skip-limit counts across epochs
  int64_t clipped_steps = 0;                        // --clip-grad-norm, over the run
  std::vector<nlohmann::json> history;
  c10::optional<EpochState> within;
  nlohmann::json to_json() const;
  // An OptionError (resume) naming the checkpoint for a record that does not fit this run (metrics: the task's
  // count of step metrics).
  static RunState from_json(const nlohmann::json& meta, size_t metrics, const std::vector<std::string>& earlier_keys,
                            int64_t steps_per_epoch, const std::filesystem::path& checkpoint);
};

class Task {
 public:
  virtual ~Task() = default;
  virtual LoopOptions loop_options() const = 0;
  // Refuses a resume whose identity options differ from the saved config.json's (UsageError).
  virtual void check_resume(const std::string& saved_config, const std::filesystem::path& out) const = 0;
  // Loads the data and builds the network on place.device; called once, before the ranks connect.
  virtual void setup(const RunPlace& place) = 0;
  // Data parallel: the communicator, once the ranks are connected (for a loss that needs collectives).
  virtual void set_communicator(dist::Communicator* comm) {}
  // What is checkpointed, broadcast from rank 0 and compared across ranks at the end.
  virtual torch::nn::Module& module() = 0;
  // What the optimizer trains (and the all-reduce averages).
  virtual optim::NamedParameters trainable() = 0;
  virtual BatchSource& batches() = 0;
  virtual OptimizerPlan plan_optimizer(int64_t steps_per_epoch, int64_t total_steps) = 0;
  // The lines of the banner (after setup and plan_optimizer).
  virtual std::vector<std::string> banner(const OptimizerPlan& plan, int64_t steps_per_epoch) = 0;
  // The config.json of the run, with the learning rate the plan used.
  virtual std::string config_json(double lr_used) const = 0;

  // Whether the loss is a mean over examples (its micro-batches and ranks add up to the batch's) or a function
  // of the whole batch (Barlow Twins' cross-correlation): such a task refuses micro-batches, and its metrics are
  // the same on every rank instead of being summed over ranks.
  virtual bool per_example_loss() const { return true; }
  virtual bool data_parallel() const { return true; }  // false: the loop refuses WORLD_SIZE > 1
  // Names of the metrics forward_backward returns; the first is the loss (summed over the micro-batch's examples
  // when per_example_loss(), else the batch's loss).
  virtual std::vector<std::string> step_metrics() const = 0;
  // The keys of the step metrics' sums in an unfinished epoch's record of earlier versions (one key per sum), so
  // that their checkpoints still resume; {} when there were none.
  virtual std::vector<std::string> earlier_sum_keys() const { return {}; }
  // Runs once per batch before its micro-batches (e.g. drawing views); timed apart.
  virtual void prepare(data::Batch& batch, int64_t epoch) {}
  // Forward and backward of rows [start, start + length) of this rank's batch; the loss to differentiate is the
  // metrics' loss divided by loss_divisor. Returns the metrics.
  virtual std::vector<double> forward_backward(const data::Batch& batch, int64_t start, int64_t length,
                                               double loss_divisor) = 0;
  // The running metrics of the epoch for the progress display.
  virtual std::string progress_fields(const EpochState& state, double seconds) const = 0;
  // The finished epoch's record (metrics.csv row, checkpoint history): the task's fields from the state, and its
  // evaluation (every rank calls it; comm is null in one process). The loop adds epoch, step, lr, phi and timings.
  virtual nlohmann::json epoch_record(const EpochState& state, dist::Communicator* comm) = 0;
  virtual std::string epoch_line(const nlohmann::json& record, int64_t epochs) const = 0;
  virtual std::string metrics_header() const = 0;
  virtual std::string metrics_row(const nlohmann::json& record) const = 0;
  // The task's own fields of summary.json, from the epochs' records.
  virtual nlohmann::json summary_fields(const std::vector<nlohmann::json>& history, const std::string& status) const = 0;
  // The evaluation of the module as it is now (every rank calls it), as fields named by evaluation_fields();
  // --ema-decay evaluates the averaged weights through it. A task without one returns no names.
  virtual std::vector<std::string> evaluation_fields() const { return {}; }
  virtual nlohmann::json evaluate(dist::Communicator* comm) { return nlohmann::json::object(); }
  // Files of a completed run (model.pt, backbone.pt, head.pt).
  virtual void save_artifacts(const std::filesystem::path& out) = 0;
  // The training loss on a fixed batch for --sharpness-every; null: the task has none.
  virtual std::function<torch::Tensor()> sharpness_loss() { return nullptr; }
};

struct LoopResult {
  std::string status;  // completed | diverged | interrupted
  std::string message;
  int64_t steps = 0, skipped_steps = 0, clipped_steps = 0;
  int64_t world_size = 1, rank = 0, replica_mismatches = 0;
  double wall_seconds = 0;
  std::vector<nlohmann::json> history;  // the epochs' records
};

// Runs task from the start or its checkpoint to the end, a divergence or a stop request. Throws UsageError for
// bad input and SimulatedCrash for LoopOptions::crash_after_step. reporter may be null (silent).
LoopResult run_loop(Task& task, Reporter* reporter);

}  // namespace detail
}  // namespace train
}  // namespace largebatch
