#include <largebatch/optim/layerwise.h>
#include <largebatch/train/trainer.h>

#include <largebatch/data/pipeline.h>
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/report/plot.h>
#include <largebatch/train/precision.h>
#include <largebatch/train/sharpness.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <unistd.h>

#include <algorithm>
#include <limits>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <thread>

#include "classification_metrics.h"
#include "config_fields.h"
#include "run_loop.h"

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

void request_stop() { stop_flag() = true; }

// ------------------------------------------------------------------ config

std::string TrainConfig::to_json() const { return config_to_json(*this); }

TrainConfig TrainConfig::from_json(const std::string& text, const std::string& source) {
  return config_from_json<TrainConfig>(text, source);
}

void TrainConfig::validate() const {
  check_options(*this);
  if (bn_group_size > 0 && sync_bn)
    throw OptionError("bn-group-size", ": ghost BatchNorm groups and {sync-bn} exclude each other", {"sync-bn"});
  if (micro_batch > batch_size)
    throw OptionError("micro-batch", std::to_string(micro_batch) + " is larger than {batch-size} " + std::to_string(batch_size),
                      {"batch-size"});
  if (micro_batch > 0 && batch_size % micro_batch != 0)
    throw OptionError("micro-batch", std::to_string(micro_batch) + " does not divide {batch-size} " + std::to_string(batch_size),
                      {"batch-size"});
}

// ------------------------------------------------------------------ the classification task

namespace {

// The optimizer, its learning rate and schedule from the run's recipe (optim/recipes.h): the recipe's
// classification defaults, then --opt, then --weight-decay. total_steps feeds TVLARS's lambda = 2 / T.
lo::ResolvedRecipe resolve_optimizer(const TrainConfig& c, int64_t total_steps) {
  auto given = c.optimizer_options;
  if (c.weight_decay >= 0) given["weight_decay"] = std::to_string(c.weight_decay);
  return lo::resolve_recipe(c.optimizer, lo::Task::kClassification, c.batch_size, total_steps, c.lr, c.schedule,
                            given);
}

struct Evaluation {
  double loss = 0, top1 = 0, top5 = 0;
};

// The whole set's metrics: each rank evaluates its shard of every batch (the global batch rounded up to a multiple
// of world) and the sums are added over ranks, so every image counts exactly once.
Evaluation evaluate_on(models::ClassifierImpl& model, const data::ImageDataset& set, int64_t batch_size,
                    torch::Device device, dist::Communicator* comm) {
  const int64_t rank = comm ? comm->rank() : 0, world = comm ? comm->world() : 1;
  torch::NoGradGuard no_grad;
  model.eval();
  data::LoaderOptions o;
  o.shuffle = false;
  o.workers = 1;
  o.batch_size = (batch_size + world - 1) / world * world;
  o.rank = rank;
  o.world = world;
  data::BatchLoader loader(set, o);
  loader.start_epoch(0);
  data::Batch batch;
  double loss_sum = 0, correct1 = 0, correct5 = 0, n = 0;
  const int64_t k = std::min<int64_t>(5, set.num_classes);
  while (loader.next(batch)) {
    if (batch.labels.size(0) == 0) continue;
    auto x = batch.images.to(device), y = batch.labels.to(device);
    auto logits = model.forward(x);
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    auto hits = std::get<1>(logits.topk(k, 1)).eq(y.unsqueeze(1));
    correct1 += static_cast<double>(hits.select(1, 0).sum().item<int64_t>());
    correct5 += static_cast<double>(hits.any(1).sum().item<int64_t>());
    n += static_cast<double>(y.size(0));
  }
  model.train();
  if (comm) {
    auto t = torch::tensor({loss_sum, correct1, correct5, n}, torch::kFloat64);
    dist::guarded(*comm, [&] { comm->all_reduce_sum(t); });
    loss_sum = t[0].item<double>(), correct1 = t[1].item<double>(), correct5 = t[2].item<double>();
    n = t[3].item<double>();
  }
  return {loss_sum / n, correct1 / n, correct5 / n};
}

class ClassificationTask : public Task {
 public:
  explicit ClassificationTask(const TrainConfig& config) : c_(config) {}

  LoopOptions loop_options() const override {
    LoopOptions o = common_loop_options(c_, "train");
    o.micro_batch = c_.micro_batch;
    o.telemetry_every = c_.telemetry_every;
    o.sharpness_every = c_.sharpness_every;
    o.sharpness_iterations = c_.sharpness_iterations;
    o.sync_bn = c_.sync_bn;
    o.dist_timeout = c_.dist_timeout;
    o.bucket_mb = c_.bucket_mb;
    o.clip_grad_norm = c_.clip_grad_norm;
    o.ema_decay = c_.ema_decay;
    return o;
  }

  void check_resume(const std::string& saved, const fs::path& out) const override {
    require_same_identity(c_, saved, out);
  }

  void setup(const RunPlace& place) override {
    place_ = place;
    split_ = load_data(c_.data, c_.data_dir, c_.synthetic_size, c_.seed);
    if (c_.val_split > 0) {  // --val-split's images, taken out of the training set
      try {
        auto held = data::hold_out(split_.train, c_.val_split);
        split_.train = std::move(held.train);
        validation_ = std::move(held.validation);
      } catch (const std::invalid_argument& e) {
        throw OptionError("val-split", std::string(": ") + e.what());
      }
    }
    const auto& train_set = split_.train;
    model_ = make_classifier(c_.model, train_set, c_.init, c_.seed, train_set.num_classes);
    model_->set_channels_last(c_.channels_last);
    model_->set_cpu_kernels(c_.cpu_kernels);
    if (c_.bn_group_size > 0 && model_->set_bn_group_size(c_.bn_group_size) == 0)
      throw OptionError("bn-group-size", ": model " + c_.model + " has no BatchNorm layer");
    model_->to(place.device);

    data::LoaderOptions o;
    o.batch_size = c_.batch_size;
    o.shuffle = true;
    o.drop_last = c_.drop_last;
    o.seed = c_.seed;
    o.workers = c_.loader_workers;
    o.prefetch = 2;
    o.augment = data::augment_preset(c_.augment, c_.data);  // checked by validate()
    o.mix.mixup_alpha = c_.mixup;
    o.mix.cutmix_alpha = c_.cutmix;
    o.mix.switch_prob = c_.mixup_switch_prob;
    o.rank = place.rank;
    o.world = place.world;
    source_ = std::make_unique<LoaderSource>(train_set, o);
    if (source_->batches_per_epoch() == 0)
      throw OptionError("batch-size", std::to_string(c_.batch_size) + " with {drop-last} leaves no batch", {"drop-last"});
    const int64_t last_batch = train_set.size() % c_.batch_size;
    if (place.world > 1 && !c_.drop_last && last_batch > 0 && last_batch < place.world)
      throw OptionError("batch-size", std::to_string(c_.batch_size) + " leaves a last batch of " +
                                          std::to_string(last_batch) + " image(s), fewer than the " +
                                          std::to_string(place.world) + " ranks; set {drop-last} or change batch-size",
                        {"drop-last"});
    if (c_.sharpness_every > 0) {  // a fixed batch: the first training images, unaugmented
      data::LoaderOptions first_options;
      first_options.batch_size = std::min(c_.sharpness_batch, train_set.size());
      first_options.shuffle = false;
      data::BatchLoader first(train_set, first_options);
      first.start_epoch(0);
      data::Batch b;
      first.next(b);
      sharpness_x_ = b.images.to(place.device);
      sharpness_y_ = b.labels.to(place.device);
    }
  }

  torch::nn::Module& module() override { return *model_; }
  lo::NamedParameters trainable() override { return model_->named_parameters(); }
  BatchSource& batches() override { return *source_; }

  OptimizerPlan plan_optimizer(int64_t steps_per_epoch, int64_t total_steps) override {
    lo::ScheduleOptions so = schedule_options(c_, steps_per_epoch, total_steps);
    so.scaling = lo::parse_lr_scaling(c_.lr_scaling);
    return plan_from_recipe(resolve_optimizer(c_, total_steps), model_->named_parameters(), c_.batch_size, so);
  }

  std::vector<std::string> banner(const OptimizerPlan& plan, int64_t steps_per_epoch) override {
    return {format("largebatch train: %s (%lld train / %lld test%s) | %s (%lld parameters) | %s | batch %lld%s | "
                   "%lld epochs x %lld steps | %s",
                   c_.data.c_str(), static_cast<long long>(split_.train.size()),
                   static_cast<long long>(split_.test.size()),
                   c_.val_split > 0 ? format(" / %lld validation", static_cast<long long>(c_.val_split)).c_str() : "",
                   c_.model.c_str(), static_cast<long long>(models::parameter_count(*model_)),
                   plan.description.c_str(), static_cast<long long>(c_.batch_size),
                   c_.micro_batch > 0 ? format(" (micro-batches of %lld)", static_cast<long long>(c_.micro_batch)).c_str() : "",
                   static_cast<long long>(c_.epochs), static_cast<long long>(steps_per_epoch), c_.out.c_str())};
  }

  // config.json records the learning rate used (a recipe's default resolved), so that it alone rebuilds the run.
  std::string config_json(double lr_used) const override {
    TrainConfig recorded = c_;
    recorded.lr = lr_used;
    return recorded.to_json();
  }

  std::vector<std::string> step_metrics() const override { return {"loss_sum", "correct"}; }
  std::vector<std::string> earlier_sum_keys() const override { return {"loss_sum", "correct"}; }

  std::vector<double> forward_backward(const data::Batch& batch, int64_t start, int64_t length,
                                       double loss_divisor) override {
    const auto x = batch.images.narrow(0, start, length).to(place_.device);
    const auto y = batch.labels.narrow(0, start, length).to(place_.device);
    torch::Tensor logits;
    {
      const AutocastGuard autocast(bf16_, place_.device);
      logits = model_->forward(x);
    }
    logits = logits.to(torch::kFloat);  // the loss in float32 whatever the precision
    const bool mixed = batch.mix_labels.defined();
    const auto y2 = mixed ? batch.mix_labels.narrow(0, start, length).to(place_.device) : torch::Tensor();
    const auto loss_sum = classification_loss_sum(logits, y, y2, batch.mix_lambda, c_.label_smoothing);
    (loss_sum / loss_divisor).backward();
    // A mixed image counts as correct by the weights of its two labels.
    const auto predicted = logits.argmax(1);
    double correct = static_cast<double>(predicted.eq(y).sum().item<int64_t>());
    if (mixed)
      correct = batch.mix_lambda * correct +
                (1 - batch.mix_lambda) * static_cast<double>(predicted.eq(y2).sum().item<int64_t>());
    return {loss_sum.item<double>(), correct};
  }

  std::string progress_fields(const EpochState& s, double seconds) const override {
    const double seen = static_cast<double>(s.seen);
    return format("loss %.4f acc %.4f %.0f img/s", s.sums[0] / seen, s.sums[1] / seen, seen / seconds);
  }

  json epoch_record(const EpochState& s, dist::Communicator* comm) override {
    EpochRecord r;
    const double seen = static_cast<double>(s.seen);
    r.train_loss = s.seen ? s.sums[0] / seen : NAN;  // NaN: every step of the epoch skipped
    r.train_acc = s.seen ? s.sums[1] / seen : NAN;
    json j = record_json(r);
    j.update(evaluate(comm));
    return j;
  }

  std::vector<std::string> evaluation_fields() const override {
    return {"test_loss", "test_top1", "test_top5", "val_loss", "val_top1", "val_top5"};
  }

  json evaluate(dist::Communicator* comm) override {
    const Evaluation test = evaluate_on(*model_, split_.test, c_.eval_batch_size, place_.device, comm);
    json j{{"test_loss", test.loss}, {"test_top1", test.top1}, {"test_top5", test.top5},
           {"val_loss", nullptr},    {"val_top1", nullptr},    {"val_top5", nullptr}};
    if (c_.val_split > 0) {
      const Evaluation val = evaluate_on(*model_, validation_, c_.eval_batch_size, place_.device, comm);
      j["val_loss"] = val.loss;
      j["val_top1"] = val.top1;
      j["val_top5"] = val.top5;
    }
    return j;
  }

  std::string epoch_line(const json& record, int64_t epochs) const override {
    return classification_epoch_line(record_from(record), epochs);
  }
  std::string metrics_header() const override { return detail::metrics_header(); }
  std::string metrics_row(const json& record) const override { return detail::metrics_row(record_from(record)); }

  json summary_fields(const std::vector<json>& history, const std::string& status) const override {
    json s = classification_summary_fields(history, c_.val_split);
    s["optimizer"] = c_.optimizer;
    s["model"] = c_.model;
    s["data"] = c_.data;
    s["images"] = {{"train", split_.train.size()}, {"validation", validation_.size()}, {"test", split_.test.size()}};
    s["seed"] = c_.seed;
    return s;
  }

  void save_artifacts(const fs::path& out) override { save_module(out / "model.pt", *model_); }

  std::function<torch::Tensor()> sharpness_loss() override {
    return [this] { return torch::nn::functional::cross_entropy(model_->forward(sharpness_x_), sharpness_y_); };
  }

 private:
  const TrainConfig& c_;
  const bool bf16_ = is_bf16(c_.precision);
  RunPlace place_;
  data::DatasetSplit split_;
  data::ImageDataset validation_;
  models::Classifier model_{nullptr};
  std::unique_ptr<LoaderSource> source_;
  torch::Tensor sharpness_x_, sharpness_y_;
};

}  // namespace

LrFindResult run_lr_find(const TrainConfig& config, const LrFindOptions& o, Reporter* reporter) {
  config.validate();
  if (!(o.lr_min > 0) || !std::isfinite(o.lr_min)) throw OptionError("lr-min", format("%g", o.lr_min) + " must be finite and > 0");
  if (!(o.lr_max > o.lr_min) || !std::isfinite(o.lr_max))
    throw OptionError("lr-max", format("%g", o.lr_max) + " must be finite and above {lr-min}", {"lr-min"});
  if (o.steps < 2) throw OptionError("steps", std::to_string(o.steps) + " must be >= 2");
  if (!(o.smoothing >= 0 && o.smoothing < 1)) throw OptionError("smooth-beta", format("%g", o.smoothing) + " must be in [0, 1)");
  if (!(o.diverge_factor > 1) || !std::isfinite(o.diverge_factor))
    throw OptionError("diverge-factor", format("%g", o.diverge_factor) + " must be finite and > 1");
  set_threads(config.threads);
  RunPlace place;
  place.device = parse_device(config.device);
  const fs::path out = config.out;
  fs::create_directories(out);
  ClassificationTask task(config);
  task.setup(place);
  BatchSource& source = task.batches();
  OptimizerPlan plan = task.plan_optimizer(source.batches_per_epoch(), o.steps);
  torch::optim::Optimizer& optimizer = *plan.optimizer;
  if (reporter)
    reporter->info(format("largebatch lr-find: %s, %s, batch %lld, lr %g to %g over %lld steps", config.model.c_str(),
                          config.optimizer.c_str(), static_cast<long long>(config.batch_size), o.lr_min, o.lr_max,
                          static_cast<long long>(o.steps)));
  LrFindResult r;
  r.stopped = "range end";
  int64_t epoch = 0;
  source.start_epoch(epoch, 0);
  double average = 0, lowest = std::numeric_limits<double>::infinity();
  std::string csv = "step,lr,loss,smoothed_loss\n";
  for (int64_t t = 0; t < o.steps; ++t) {
    data::Batch batch;
    if (!source.next(batch)) {
      source.start_epoch(++epoch, 0);
      if (!source.next(batch)) throw std::logic_error("lr-find: an epoch without batches");
    }
    const double lr = o.lr_min * std::pow(o.lr_max / o.lr_min, static_cast<double>(t) / static_cast<double>(o.steps - 1));
    lo::set_learning_rate(optimizer, lr);
    task.prepare(batch, epoch);
    optimizer.zero_grad();
    const double global = static_cast<double>(batch.global_size);
    const double loss = task.forward_backward(batch, 0, batch.labels.size(0), global).at(0) / global;
    if (!std::isfinite(loss)) {
      r.stopped = "non-finite loss";
      break;
    }
    optimizer.step();
    average = o.smoothing * average + (1 - o.smoothing) * loss;
    const double smoothed = average / (1 - std::pow(o.smoothing, static_cast<double>(t + 1)));
    r.lr.push_back(lr);
    r.loss.push_back(loss);
    r.smoothed.push_back(smoothed);
    csv += format("%lld,%.9g,%.9g,%.9g\n", static_cast<long long>(t), lr, loss, smoothed);
    if (smoothed < lowest) {
      lowest = smoothed;
      r.min_loss_lr = lr;
    }
    if (reporter) reporter->step(0, 1, t, o.steps, format("lr %.3g loss %.4f smoothed %.4f", lr, loss, smoothed));
    if (smoothed > o.diverge_factor * lowest) {
      r.stopped = "diverged";
      break;
    }
  }
  if (r.lr.empty()) throw UsageError("lr-find: the first step's loss is not finite at --lr-min " + format("%g", o.lr_min));
  r.suggested_lr = r.min_loss_lr / 10;
  write_atomically(out / "lr_find.csv", csv);
  const json summary{{"lr_min", o.lr_min}, {"lr_max", o.lr_max}, {"steps", o.steps}, {"steps_taken", r.lr.size()},
                     {"smoothing", o.smoothing}, {"diverge_factor", o.diverge_factor}, {"stopped", r.stopped},
                     {"min_loss_lr", r.min_loss_lr}, {"suggested_lr", r.suggested_lr},
                     {"optimizer_resolved", plan.resolved}, {"config", json::parse(config.to_json())}};
  write_atomically(out / "lr_find.json", summary.dump(2) + "\n");
  report::PlotSpec spec;
  spec.png = (out / "lr_find.png").string();
  spec.title = "LR range test: " + config.model + ", " + config.optimizer + ", batch " + std::to_string(config.batch_size);
  spec.x_label = "learning rate";
  spec.y_label = "training loss";
  spec.log_x = true;
  const std::string csv_path = (out / "lr_find.csv").string();
  spec.series = {{csv_path, "lr", "loss", "loss", false}, {csv_path, "lr", "smoothed_loss", "smoothed", false}};
  std::string error;
  if (!report::plot(spec, &error) && reporter) reporter->warning("no plot: " + error);
  return r;
}

TrainSummary run_training(const TrainConfig& config, Reporter* reporter) {
  config.validate();
  check_schedule(resolve_optimizer(config, 0).schedule, config.optimizer, config.warmup_epochs, config.epochs,
                 config.step_epochs);
  ClassificationTask task(config);
  return classification_summary(run_loop(task, reporter));
}

}  // namespace train
}  // namespace largebatch
