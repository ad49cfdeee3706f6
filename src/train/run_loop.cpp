// The training loop of every command (see run_loop.h). Read top to bottom: set-up, restore, one epoch, one step,
// the non-finite policy, the end of the run.
#include "run_loop.h"

#include <largebatch/optim/factory.h>
#include <largebatch/report/plot.h>
#include <largebatch/train/ema.h>
#include <largebatch/train/sharpness.h>
#include <largebatch/version.h>

#include <algorithm>
#include <limits>

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;

namespace largebatch {
namespace train {
namespace detail {

OptimizerPlan plan_from_recipe(const lo::ResolvedRecipe& recipe, const lo::NamedParameters& parameters,
                               int64_t batch_size, lo::ScheduleOptions so) {
  OptimizerPlan plan;
  try {
    plan.optimizer = lo::make_optimizer({recipe.optimizer, recipe.lr, batch_size, recipe.options}, parameters);
  } catch (const std::invalid_argument& e) {
    throw OptionError("opt", std::string(": ") + e.what());
  }
  so.kind = lo::parse_schedule_kind(recipe.schedule);
  so.lr = recipe.lr;
  so.batch_size = batch_size;
  if (!lo::has_warmup(so.kind)) so.warmup_steps = 0;
  so.warmup_steps = std::min(so.warmup_steps, so.total_steps);
  const auto schedule = std::make_shared<const lo::LrSchedule>(so);
  plan.lr_at = [schedule](int64_t step) { return schedule->at(step); };
  plan.lr = recipe.lr;
  plan.description = recipe.recipe + format(" lr %.4g (%s schedule)", recipe.lr, recipe.schedule.c_str());
  plan.resolved = resolved_optimizer_json(recipe, *plan.optimizer, so.warmup_steps, so.total_steps);
  if (so.kind == lo::ScheduleKind::kPoly) plan.resolved["poly_power"] = so.poly_power;
  if (so.kind == lo::ScheduleKind::kStep) {
    plan.resolved["milestone_steps"] = so.milestones;
    plan.resolved["step_gamma"] = so.step_gamma;
  }
  if (so.kind == lo::ScheduleKind::kPoly || so.kind == lo::ScheduleKind::kWarmupCosine || so.kind == lo::ScheduleKind::kCosine)
    plan.resolved["final_ratio"] = so.final_ratio;
  return plan;
}

void check_schedule(const std::string& schedule, const std::string& optimizer, double warmup_epochs, int64_t epochs,
                    const std::string& step_epochs) {
  const lo::ScheduleKind kind = lo::parse_schedule_kind(schedule);
  warmup_epochs = warmup_epochs_of(warmup_epochs, epochs);
  if (lo::has_warmup(kind) && warmup_epochs > static_cast<double>(epochs))
    throw OptionError("warmup-epochs", format("%g", warmup_epochs) + " is longer than {epochs} " +
                                           std::to_string(epochs) + " (the " + optimizer + " schedule is " +
                                           schedule + ")",
                      {"epochs"});
  if (kind == lo::ScheduleKind::kStep && step_epochs.empty())
    throw OptionError("step-epochs", ": the step schedule needs its milestones (e.g. {step-epochs} 30,60)");
}

json EpochState::to_json() const {
  return json{{"batch", index},          {"sums", sums},               {"steps_done", steps_done},
              {"seen", seen},            {"lr", lr},                   {"phi", phi},
              {"prepare_s", prepare_s},  {"compute_s", compute_s},     {"allreduce_s", allreduce_s},
              {"optimizer_s", optimizer_s}, {"sharpness_s", sharpness_s}, {"elapsed_s", elapsed_s},
              {"grad_norm_sum", grad_norm_sum}, {"grad_norm_max", grad_norm_max}, {"clipped_steps", clipped_steps}};
}

EpochState EpochState::from_json(const json& j, size_t metrics, const std::vector<std::string>& earlier_keys) {
  EpochState s;
  s.sums.assign(metrics, 0.0);
  if (j.empty()) return s;
  s.index = j.at("batch");
  if (j.contains("sums")) {
    s.sums = j.at("sums").get<std::vector<double>>();
  } else {  // a checkpoint of an earlier version: one key per sum
    if (earlier_keys.size() != metrics) throw std::invalid_argument("no \"sums\" of the unfinished epoch");
    for (size_t i = 0; i < metrics; ++i) s.sums[i] = j.at(earlier_keys[i]).get<double>();
  }
  if (s.sums.size() != metrics)
    throw std::invalid_argument(std::to_string(s.sums.size()) + " metrics of the unfinished epoch, this run has " +
                                std::to_string(metrics));
  s.steps_done = j.value("steps_done", int64_t{0});
  s.seen = j.at("seen");
  s.lr = j.at("lr");
  s.phi = j.at("phi");
  s.prepare_s = j.contains("prepare_s") ? j.at("prepare_s").get<double>() : j.value("augment_s", 0.0);
  s.compute_s = j.at("compute_s");
  s.allreduce_s = j.at("allreduce_s");
  s.optimizer_s = j.at("optimizer_s");
  s.sharpness_s = j.value("sharpness_s", 0.0);
  s.elapsed_s = j.at("elapsed_s");
  s.grad_norm_sum = j.value("grad_norm_sum", 0.0);
  s.grad_norm_max = j.value("grad_norm_max", 0.0);
  s.clipped_steps = j.value("clipped_steps", int64_t{0});
  return s;
}

json RunState::to_json() const {
  json meta{{"epoch", epoch},
            {"step", step},
            {"skipped_steps", skipped_steps},
            {"skipped_in_a_row", skipped_in_a_row},
            {"clipped_steps", clipped_steps},
            {"history", history}};
  if (within) meta["within_epoch"] = within->to_json();
  return meta;
}

RunState RunState::from_json(const json& meta, size_t metrics, const std::vector<std::string>& earlier_keys,
                             int64_t steps_per_epoch, const fs::path& checkpoint) {
  RunState s;
  const json within = within_epoch_of(meta, steps_per_epoch, checkpoint);
  try {
    s.epoch = meta.at("epoch");
    s.step = meta.at("step");
    s.skipped_steps = meta.value("skipped_steps", int64_t{0});
    s.skipped_in_a_row = meta.value("skipped_in_a_row", int64_t{0});
    s.clipped_steps = meta.value("clipped_steps", int64_t{0});
    for (const auto& r : meta.at("history")) s.history.push_back(r);
    if (!within.empty()) s.within = EpochState::from_json(within, metrics, earlier_keys);
  } catch (const std::exception& e) {  // a missing or mistyped field, or another task's metrics
    throw OptionError("resume", ": checkpoint " + checkpoint.string() + ": its meta record does not fit this run (" +
                                    e.what() + ")");
  }
  return s;
}

namespace {

class RunLoop {
 public:
  RunLoop(Task& task, Reporter* reporter) : task_(task), reporter_(reporter), o_(task.loop_options()) {}

  LoopResult run() {
    stop_flag() = false;  // a stop request from here on (loading and restoring included) ends the first step
    t_start_ = Clock::now();
    set_up();
    restore();
    start_outputs();
    announce();
    result_.status = "completed";
    task_.module().train();
    for (int64_t epoch = start_epoch_; epoch < o_.epochs && result_.status == "completed"; ++epoch) run_epoch(epoch);
    finish();
    return result_;
  }

 private:
  enum class StepEnd { kTaken, kSkipped, kEnded };

  void info(const std::string& line) {
    if (report()) report()->info(line);
  }
  Reporter* report() const { return place_.lead ? reporter_ : nullptr; }
  // An option as messages name it (the reporter's wording, the key without one).
  std::string option(const std::string& key) const { return reporter_ ? reporter_->option(key) : key; }

  // ---------------------------------------------------------------- set-up
  void set_up() {
    (void)lo::fused_step_instruction_set();  // a bad LARGEBATCH_STEP_SIMD is refused before any work
    set_threads(o_.threads);
    place_.device = parse_device(o_.device);
    try {
      env_ = dist::launch_env_from_environment();
    } catch (const std::invalid_argument& e) {
      usage(e.what());
    }
    place_.rank = env_.rank;
    place_.world = env_.world;
    place_.lead = env_.rank == 0;
    const int64_t world = env_.world;
    if (env_.distributed() && !task_.data_parallel())
      usage(o_.command + " runs in one process (WORLD_SIZE is " + std::to_string(world) +
            "); start it without a launcher");
    if (o_.batch_size % world != 0)
      throw OptionError("batch-size", std::to_string(o_.batch_size) + " is not divisible by the world size " +
            std::to_string(world) + " (WORLD_SIZE)");
    if (o_.micro_batch > 0 && !task_.per_example_loss())
      throw OptionError("micro-batch", ": the " + o_.command + " loss is a function of the whole batch, not a sum over its images");
    if (o_.micro_batch > 0 && (o_.batch_size / world) % o_.micro_batch != 0)
      throw OptionError("micro-batch", std::to_string(o_.micro_batch) + " does not divide the per-rank batch " +
            std::to_string(o_.batch_size / world) + " ({batch-size} / WORLD_SIZE)",
                        {"batch-size"});
    checkpoint_path_ = o_.out / "checkpoint.pt";
    // Never overwrite a previous run's results; a resume needs the same identity.
    resuming_ = prepare_output_dir(o_.out, o_.resume, place_.lead, report(), [&](const std::string& saved) {
      task_.check_resume(saved, o_.out);
    });
    task_.setup(place_);
    if (env_.distributed())
      comm_ = connect_ranks(env_, place_.device, o_.dist_timeout, o_.sync_bn, task_.module(), &cross_rank_sum_);
    task_.set_communicator(comm_.get());
    metric_count_ = task_.step_metrics().size();  // asked once: the step runs without building the names
    steps_per_epoch_ = task_.batches().batches_per_epoch();
    if (steps_per_epoch_ == 0)
      throw OptionError("batch-size", std::to_string(o_.batch_size) + " leaves no batch in an epoch");
    total_steps_ = o_.epochs * steps_per_epoch_;
    plan_ = task_.plan_optimizer(steps_per_epoch_, total_steps_);
    layerwise_ = dynamic_cast<lo::LayerwiseOptimizer*>(plan_.optimizer.get());
    // The last step's trust ratios name the culprit layer if the loss diverges.
    if (layerwise_) layerwise_->set_telemetry(true);
    if (layerwise_)
      tv_ = static_cast<const lo::LayerwiseOptions&>(layerwise_->param_groups()[0].options()).time_varying();
    if (o_.sharpness_every > 0) {
      sharpness_loss_ = task_.sharpness_loss();
      if (!sharpness_loss_) throw OptionError("sharpness-every", ": " + o_.command + " has no training loss on a fixed batch");
    }
    if (o_.ema_decay > 0) {
      if (task_.evaluation_fields().empty())
        throw OptionError("ema-decay", ": " + o_.command + " has no evaluation to run on the averaged weights");
      average_ = std::make_unique<WeightAverage>(task_.module(), o_.ema_decay);  // starts at the initial weights
    }
  }

  // The checkpoint, when resuming: weights, optimizer state, the history and an unfinished epoch.
  void restore() {
    if (!resuming_) return;
    std::vector<torch::Tensor> average;
    const json meta = load_checkpoint(checkpoint_path_, task_.module(), *plan_.optimizer, place_.device, &average);
    if (average_) {
      if (average.empty()) {
        average_ = std::make_unique<WeightAverage>(task_.module(), o_.ema_decay);
        info("note: the checkpoint has no weight average; " + option("ema-decay") + " starts it at the resumed weights");
      } else {
        try {
          average_->load(average);
        } catch (const std::invalid_argument& e) {
          throw OptionError("resume", ": checkpoint " + checkpoint_path_.string() + ": " + e.what());
        }
      }
    }
    const RunState state = RunState::from_json(meta, metric_count_, task_.earlier_sum_keys(),
                                               steps_per_epoch_, checkpoint_path_);
    start_epoch_ = state.epoch;
    step_ = state.step;
    within_epoch_ = state.within;
    skipped_in_a_row_ = state.skipped_in_a_row;
    result_.skipped_steps = state.skipped_steps;
    result_.clipped_steps = state.clipped_steps;
    result_.history = state.history;
    if (within_epoch_)
      info(format("resumed %s in epoch %lld after its batch %lld (step %lld)", o_.out.c_str(),
                  static_cast<long long>(start_epoch_ + 1), static_cast<long long>(within_epoch_->index),
                  static_cast<long long>(step_)));
    else
      info(format("resumed %s at epoch %lld (step %lld)", o_.out.c_str(), static_cast<long long>(start_epoch_),
                  static_cast<long long>(step_)));
  }

  // metrics.csv (rewritten from the checkpoint on resume: rows after it are dropped), config.json, the gradient
  // averager, telemetry.csv and sharpness.csv.
  void start_outputs() {
    if (place_.lead) {
      std::string rows = metrics_header();
      for (const auto& r : result_.history) rows += metrics_row(r);
      write_atomically(o_.out / "metrics.csv", rows);
    }
    require_same_resume_point(comm_.get(), resuming_, step_, o_.out);
    if (place_.lead) write_atomically(o_.out / "config.json", task_.config_json(plan_.lr));
    // Every rank starts from rank 0's parameters and buffers (fresh or resumed), then gradients are averaged in
    // buckets that overlap backward.
    if (comm_) {
      dist::broadcast_module(task_.module(), *comm_);
      // A fresh average starts at rank 0's weights too (a resumed one came from the checkpoint).
      if (average_ && !resuming_) average_ = std::make_unique<WeightAverage>(task_.module(), o_.ema_decay);
      std::vector<torch::Tensor> trainable;
      for (const auto& kv : task_.trainable()) trainable.push_back(kv.value());
      averager_ = std::make_unique<dist::GradientAverager>(trainable, comm_, std::llround(o_.bucket_mb * 1024 * 1024));
    }
    if (o_.telemetry_every > 0 && place_.lead) {
      open_telemetry(telemetry_, o_.out / "telemetry.csv", resuming_, step_);
      if (!layerwise_) info("note: " + option("telemetry-every") + " records layer-wise optimizers only; this one has no trust ratio");
    }
    if (sharpness_loss_ && place_.lead)
      open_csv_log(sharpness_log_, o_.out / "sharpness.csv", "step,epoch,top_eigenvalue,iterations,converged,seconds",
                   resuming_, step_ + 1, "sharpness-every");
  }

  // The banner: the task's lines, then data parallelism and the optimizer's every option.
  void announce() {
    for (const auto& line : task_.banner(plan_, steps_per_epoch_)) info(line);
    if (comm_)
      info(format("data parallel: %lld ranks over %s (launch: %s), %lld images per rank and step, %s BatchNorm, "
                  "%lld gradient buckets",
                  static_cast<long long>(env_.world), comm_->backend().c_str(), env_.source.c_str(),
                  static_cast<long long>(o_.batch_size / env_.world), o_.sync_bn ? "synchronised" : "per-rank",
                  static_cast<long long>(averager_->bucket_count())));
    if (layerwise_)
      info("optimizer options: " +
           static_cast<const lo::LayerwiseOptions&>(layerwise_->param_groups()[0].options()).describe());
  }

  // ---------------------------------------------------------------- one epoch
  void run_epoch(int64_t epoch) {
    BatchSource& source = task_.batches();
    const double wait_before = source.wait_seconds();
    // A resumed epoch continues from the checkpoint's batch with its sums (JSON keeps doubles exactly).
    EpochState s;
    if (epoch == start_epoch_ && within_epoch_) s = *within_epoch_;
    else s.sums.assign(metric_count_, 0.0);
    const auto t_epoch = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(s.elapsed_s));
    source.start_epoch(epoch, s.index);
    data::Batch batch;
    while (source.next(batch)) {
      bool stop_now = false;
      const StepEnd end = take_step(batch, s, epoch, stop_now);
      if (end == StepEnd::kEnded) return;
      ++s.index;
      if (end == StepEnd::kTaken && report())
        report()->step(epoch, o_.epochs, s.index - 1, steps_per_epoch_,
                       task_.progress_fields(s, seconds_since(t_epoch)));
      // A checkpoint within the epoch when one is due or a stop was asked for (a stop after the epoch's last
      // batch too: the resumed run then starts with the evaluation), then the test crash hook.
      if (place_.lead && checkpoint_within_epoch_due(o_.checkpoint_every, step_, s.index, steps_per_epoch_, stop_now)) {
        s.elapsed_s = seconds_since(t_epoch);
        save(epoch, &s);
      }
      if (o_.crash_after_step >= 0 && step_ > o_.crash_after_step)
        throw SimulatedCrash("simulated crash after step " + std::to_string(o_.crash_after_step));
      if (stop_now) {
        result_.status = "interrupted";
        result_.message = "stopped by a signal at step " + std::to_string(step_) + "; resume from " +
                          (fs::exists(checkpoint_path_) ? checkpoint_path_.string() : "the start (no checkpoint yet)");
        return;
      }
    }
    if (telemetry_.is_open()) telemetry_.flush();
    const double train_seconds = seconds_since(t_epoch) - s.sharpness_s;  // images/s of training alone
    // Without --sync-bn each rank's BatchNorm running statistics saw only its shards: evaluate (and save) rank 0's,
    // as DistributedDataParallel does by broadcasting buffers.
    if (comm_) dist::broadcast_buffers(task_.module(), *comm_);
    json r = task_.epoch_record(s, comm_.get());
    if (average_) {
      const json averaged = evaluate_average();
      for (const auto& [key, value] : averaged.items()) r["ema_" + key] = value;
    }
    r["epoch"] = epoch + 1;
    r["step"] = step_;
    r["lr"] = s.lr;
    r["phi"] = s.phi;
    r["epoch_seconds"] = seconds_since(t_epoch);
    r["img_per_s"] = static_cast<double>(s.seen) / train_seconds;
    r["data_wait_s"] = source.wait_seconds() - wait_before;
    r["compute_s"] = s.compute_s;
    r["allreduce_s"] = s.allreduce_s;
    r["optimizer_s"] = s.optimizer_s;
    if (o_.clip_grad_norm > 0) {
      r["grad_norm"] = s.steps_done > 0 ? s.grad_norm_sum / static_cast<double>(s.steps_done) : 0.0;
      r["grad_norm_max"] = s.grad_norm_max;
      r["clipped_steps"] = s.clipped_steps;
    }
    result_.history.push_back(r);
    // Checkpoint first, then the metrics row: the CSV never runs ahead of what can be resumed.
    if (place_.lead) {
      save(epoch + 1, nullptr);
      append_line(o_.out / "metrics.csv", metrics_row(r));
    }
    if (report()) report()->epoch(task_.epoch_line(r, o_.epochs));
  }

  // The checkpoint: epoch (the next to run, or the unfinished one with `within`) and the run so far.
  void save(int64_t epoch, const EpochState* within) {
    if (telemetry_.is_open()) telemetry_.flush();  // the rows the checkpoint covers are on disk before it
    RunState state;
    state.epoch = epoch;
    state.step = step_;
    state.skipped_steps = result_.skipped_steps;
    state.skipped_in_a_row = skipped_in_a_row_;
    state.clipped_steps = result_.clipped_steps;
    state.history = result_.history;
    if (within) state.within = *within;
    save_checkpoint(checkpoint_path_, task_.module(), *plan_.optimizer, state.to_json(),
                    average_ ? &average_->tensors() : nullptr);
  }

  // ---------------------------------------------------------------- one step
  StepEnd take_step(data::Batch& batch, EpochState& s, int64_t epoch, bool& stop_now) {
    torch::optim::Optimizer& optimizer = *plan_.optimizer;
    s.lr = plan_.lr_at(step_);
    s.phi = tv_ ? lo::tv_phi(*tv_, step_) : 1.0;
    lo::set_learning_rate(optimizer, s.lr);
    auto t_phase = Clock::now();
    task_.prepare(batch, epoch);
    s.prepare_s += seconds_since(t_phase);
    t_phase = Clock::now();
    if (averager_) averager_->zero_grad();
    else optimizer.zero_grad();
    const int64_t b = batch.labels.size(0);  // this rank's shard
    const int64_t global_b = batch.global_size;  // the step's global batch (an epoch's last may be partial)
    if (b <= 0 || global_b < b) throw std::logic_error("a batch source gave a batch without its global size");
    const bool per_example = task_.per_example_loss();
    const int64_t micro = per_example && o_.micro_batch > 0 ? o_.micro_batch : b;
    // Gradient accumulation: each micro-batch's summed loss is divided by the global batch (times the world size,
    // which the all-reduce average divides out), so the gradient is the mean over the global batch whatever the
    // shard sizes. BatchNorm statistics are per micro-batch (and per rank unless --sync-bn).
    const double divisor = per_example ? static_cast<double>(global_b) / static_cast<double>(place_.world) : 1.0;
    std::vector<double> metrics(metric_count_, 0.0);
    for (int64_t start = 0; start < b; start += micro) {
      const int64_t len = std::min(micro, b - start);
      if (averager_) averager_->set_last_backward(start + len >= b);
      const auto m = task_.forward_backward(batch, start, len, divisor);
      if (m.size() != metrics.size()) throw std::logic_error("a task returned other metrics than it names");
      for (size_t i = 0; i < metrics.size(); ++i) metrics[i] += m[i];
    }
    s.compute_s += seconds_since(t_phase);
    t_phase = Clock::now();
    stop_now = agree(metrics);
    s.allreduce_s += seconds_since(t_phase);
    inject_fault();
    const double loss = per_example ? metrics[0] / static_cast<double>(global_b) : metrics[0];
    if (const std::string nonfinite = nonfinite_in(loss); !nonfinite.empty())
      return skip_or_end(nonfinite, epoch, stop_now);
    skipped_in_a_row_ = 0;
    t_phase = Clock::now();
    if (o_.clip_grad_norm > 0) clip_gradients(s);
    optimizer.step();
    if (average_) average_->update();
    s.optimizer_s += seconds_since(t_phase);
    if (telemetry_.is_open() && layerwise_ && step_ % o_.telemetry_every == 0)
      write_telemetry(telemetry_, step_, layerwise_->last_telemetry());
    ++step_;
    if (sharpness_loss_ && step_ % o_.sharpness_every == 0) s.sharpness_s += measure_sharpness(epoch);
    for (size_t i = 0; i < metrics.size(); ++i) s.sums[i] += metrics[i];
    ++s.steps_done;
    s.seen += global_b;
    return StepEnd::kTaken;
  }

  // --clip-grad-norm: the averaged, accumulated gradients scaled as torch.nn.utils.clip_grad_norm_ does (by
  // N / (norm + 1e-6) when that is below 1), whatever the optimizer.
  void clip_gradients(EpochState& s) {
    std::vector<torch::Tensor> params;
    for (const auto& kv : task_.trainable())
      if (kv.value().grad().defined()) params.push_back(kv.value());
    const double norm = torch::nn::utils::clip_grad_norm_(params, o_.clip_grad_norm);
    s.grad_norm_sum += norm;
    s.grad_norm_max = std::max(s.grad_norm_max, norm);
    if (o_.clip_grad_norm / (norm + 1e-6) < 1) {
      ++s.clipped_steps;
      ++result_.clipped_steps;
    }
  }

  // metrics.csv: the task's columns, then the loop's own (the gradient norm when clipping).
  std::string metrics_header() const {
    std::string header = task_.metrics_header();
    if (o_.clip_grad_norm > 0) header.insert(header.size() - 1, ",grad_norm,grad_norm_max,clipped_steps");
    if (average_)
      for (const auto& name : task_.evaluation_fields()) header.insert(header.size() - 1, ",ema_" + name);
    return header;
  }
  std::string metrics_row(const json& r) const {
    std::string row = task_.metrics_row(r);
    std::string extra;
    const auto number = [&](const std::string& key, const char* form) {
      return "," + (r.contains(key) && r.at(key).is_number() ? format(form, r.at(key).get<double>()) : std::string());
    };
    if (o_.clip_grad_norm > 0) {
      extra += number("grad_norm", "%.6g") + number("grad_norm_max", "%.6g");
      extra += "," + (r.contains("clipped_steps") ? std::to_string(r.at("clipped_steps").get<int64_t>()) : std::string());
    }
    if (average_)
      for (const auto& name : task_.evaluation_fields()) extra += number("ema_" + name, "%.6f");
    row.insert(row.size() - 1, extra);
    return row;
  }

  // The task's evaluation of the averaged weights. Data parallel: every rank evaluates with rank 0's averaged
  // BatchNorm buffers (as with the weights' own), which the average then keeps.
  json evaluate_average() {
    average_->swap();
    if (comm_) dist::broadcast_buffers(task_.module(), *comm_);
    json fields;
    try {
      fields = task_.evaluate(comm_.get());
    } catch (...) {
      average_->swap();
      throw;
    }
    average_->swap();
    return fields;
  }

  // Data parallel: the gradients averaged, and the metrics and a stop request agreed by every rank, so all of them
  // take the same decisions. Returns whether to stop after this step.
  bool agree(std::vector<double>& metrics) {
    bool stop_now = stop_flag();
    if (!comm_) return stop_now;
    averager_->finish();
    std::vector<double> values = task_.per_example_loss() ? metrics : std::vector<double>{};
    values.push_back(stop_now ? 1.0 : 0.0);
    auto agreed = torch::tensor(values, torch::kFloat64);
    dist::guarded(*comm_, [&] { comm_->all_reduce_sum(agreed); });
    const auto a = agreed.accessor<double, 1>();
    for (size_t i = 0; i + 1 < values.size(); ++i) metrics[i] = a[static_cast<int64_t>(i)];
    return a[static_cast<int64_t>(values.size()) - 1] > 0;
  }

  // Tests: a NaN in the first gradient at the chosen steps, as an overflow after the all-reduce would leave it.
  void inject_fault() {
    const auto& at = o_.inject_nonfinite_gradient_at;
    if (std::find(at.begin(), at.end(), step_) == at.end()) return;
    torch::NoGradGuard no_grad;
    for (auto& p : task_.module().parameters())
      if (p.grad().defined()) {
        p.mutable_grad().view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
        return;
      }
  }

  // "" when the loss and every gradient are finite (the averaged gradients: every rank decides alike); one host
  // read per step for all gradients.
  std::string nonfinite_in(double loss) {
    if (!std::isfinite(loss)) return format("non-finite loss (%g)", loss);
    const std::string layer = first_nonfinite_gradient(task_.module());
    return layer.empty() ? "" : "non-finite gradient in " + layer;
  }

  // --on-nonfinite: stop ends the run as diverged; skip drops the step, unless the run cannot recover.
  StepEnd skip_or_end(const std::string& nonfinite, int64_t epoch, bool stop_now) {
    const std::string last_good = fs::exists(checkpoint_path_) ? checkpoint_path_.string() : std::string("none");
    if (o_.on_nonfinite == "stop") {
      result_.status = "diverged";
      result_.message = nonfinite + " at step " + std::to_string(step_) + " (epoch " + std::to_string(epoch + 1) + ")" +
                        largest_trust_ratio(layerwise_) + "; the last good checkpoint is " + last_good +
                        " (" + option("on-nonfinite") + " skip drops such steps instead)";
      return StepEnd::kEnded;
    }
    // Skipping cannot recover from weights that are already NaN or infinite, nor from a run that keeps failing.
    std::string hopeless;
    if (const std::string bad_weights = first_nonfinite_parameter(task_.module()); !bad_weights.empty())
      hopeless = "the weights of " + bad_weights + " are no longer finite";
    else if (skipped_in_a_row_ + 1 >= o_.skip_limit)
      hopeless = std::to_string(skipped_in_a_row_ + 1) + " steps skipped in a row (" + option("skip-limit") + " " +
                 std::to_string(o_.skip_limit) + ")";
    if (!hopeless.empty()) {
      result_.status = "diverged";
      result_.message = nonfinite + " at step " + std::to_string(step_) + ": " + hopeless +
                        ", the run cannot recover; the last good checkpoint is " + last_good;
      return StepEnd::kEnded;
    }
    // As gradient scalers do: no update, no optimizer state change; the batch counts as consumed.
    ++skipped_in_a_row_;
    ++result_.skipped_steps;
    if (report())
      report()->warning(format("step %lld: %s, step skipped (%lld so far)", static_cast<long long>(step_),
                               nonfinite.c_str(), static_cast<long long>(result_.skipped_steps)));
    ++step_;
    return StepEnd::kSkipped;
  }

  // Sharpness on the task's fixed batch. Every rank computes it (identical replicas, same batch, no collective:
  // BatchNorm is made local for it), so no rank waits in a collective meanwhile; rank 0 writes it. The
  // training-mode forward must not disturb BatchNorm's running statistics or the random stream.
  double measure_sharpness(int64_t epoch) {
    const auto t0 = Clock::now();
    torch::nn::Module& module = task_.module();
    std::vector<torch::Tensor> saved;
    for (const auto& b : module.buffers()) saved.push_back(b.detach().clone());
    torch::Tensor rng_state;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_state = gen.get_state();
    }
    if (comm_ && o_.sync_bn) models::synchronise_batchnorm(module, {});
    std::vector<torch::Tensor> params;
    for (const auto& kv : task_.trainable()) params.push_back(kv.value());
    SharpnessOptions so;
    so.max_iterations = o_.sharpness_iterations;
    so.seed = o_.seed;
    const auto e = top_hessian_eigenvalue(sharpness_loss_, params, so);
    if (comm_ && o_.sync_bn) models::synchronise_batchnorm(module, cross_rank_sum_);
    {
      torch::NoGradGuard no_grad;
      size_t i = 0;
      for (auto& b : module.buffers()) b.copy_(saved[i++]);
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_state);
    }
    const double seconds = seconds_since(t0);
    if (!sharpness_log_.is_open()) return seconds;
    sharpness_log_ << step_ << "," << epoch + 1 << "," << format("%.9g", e.eigenvalue) << "," << e.iterations << ","
                   << (e.converged ? 1 : 0) << "," << format("%.3f", seconds) << "\n";
    sharpness_log_.flush();
    return seconds;
  }

  // ---------------------------------------------------------------- the end
  void finish() {
    result_.steps = step_;
    result_.world_size = env_.world;
    result_.rank = env_.rank;
    if (comm_) {
      // Replicas must be bit-identical; the final barrier keeps rank 0 (host of the rendezvous store) alive until
      // everyone is done with collectives.
      result_.replica_mismatches = replica_mismatches(task_.module(), *comm_);
      if (result_.replica_mismatches > 0 && report())
        report()->warning(format("%lld parameter elements differ between ranks at the end of the run",
                                 static_cast<long long>(result_.replica_mismatches)));
      dist::guarded(*comm_, [&] { comm_->barrier(); });
    }
    result_.wall_seconds = seconds_since(t_start_);
    if (!place_.lead) return;
    if (result_.status == "completed") {
      task_.save_artifacts(o_.out);
      if (average_) {
        average_->swap();
        save_module(o_.out / "model_ema.pt", task_.module());
        average_->swap();
      }
    }
    json s = task_.summary_fields(result_.history, result_.status);
    s["status"] = result_.status;
    s["message"] = result_.message;
    s["epochs_done"] = result_.history.empty() ? 0 : result_.history.back().at("epoch").get<int64_t>();
    s["steps"] = result_.steps;
    s["wall_seconds"] = result_.wall_seconds;
    s["batch_size"] = o_.batch_size;
    s["world_size"] = result_.world_size;
    s["replica_mismatches"] = result_.replica_mismatches;
    s["skipped_steps"] = result_.skipped_steps;
    if (average_) {
      s["ema_decay"] = o_.ema_decay;
      const json* last = result_.history.empty() ? nullptr : &result_.history.back();
      s["final_ema_test_top1"] = last && last->contains("ema_test_top1") ? last->at("ema_test_top1") : json(nullptr);
    }
    if (o_.clip_grad_norm > 0) {
      s["clip_grad_norm"] = o_.clip_grad_norm;
      s["clipped_steps"] = result_.clipped_steps;
    }
    s["largebatch_version"] = LARGEBATCH_VERSION;
    if (!plan_.resolved.empty()) s["optimizer_resolved"] = plan_.resolved;
    write_atomically(o_.out / "summary.json", s.dump(2) + "\n");
    if (o_.plots) {
      telemetry_.close();
      const auto made = report::plot_run(o_.out.string());
      if (made.empty() && !report::gnuplot_available())
        info("note: gnuplot is not installed; plots skipped (CSV files are complete)");
    }
  }

  Task& task_;
  Reporter* reporter_;
  const LoopOptions o_;
  RunPlace place_;
  dist::LaunchEnv env_;
  std::shared_ptr<dist::Communicator> comm_;
  models::CrossRankSum cross_rank_sum_;
  std::unique_ptr<dist::GradientAverager> averager_;
  OptimizerPlan plan_;
  lo::LayerwiseOptimizer* layerwise_ = nullptr;
  c10::optional<lo::TimeVarying> tv_;
  std::function<torch::Tensor()> sharpness_loss_;
  std::unique_ptr<WeightAverage> average_;  // --ema-decay
  fs::path checkpoint_path_;
  bool resuming_ = false;
  size_t metric_count_ = 0;
  int64_t steps_per_epoch_ = 0, total_steps_ = 0;
  int64_t start_epoch_ = 0, step_ = 0, skipped_in_a_row_ = 0;
  c10::optional<EpochState> within_epoch_;  // where a checkpoint taken within an epoch left it
  std::ofstream telemetry_, sharpness_log_;
  Clock::time_point t_start_;
  LoopResult result_;
};

}  // namespace

LoopResult run_loop(Task& task, Reporter* reporter) { return RunLoop(task, reporter).run(); }

}  // namespace detail
}  // namespace train
}  // namespace largebatch
