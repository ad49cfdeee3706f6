#include <largebatch/optim/layerwise.h>
#include <largebatch/train/trainer.h>

#include <largebatch/data/pipeline.h>
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/recipes.h>
#include <largebatch/report/plot.h>
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
    const auto logits = model_->forward(x);
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
  RunPlace place_;
  data::DatasetSplit split_;
  data::ImageDataset validation_;
  models::Classifier model_{nullptr};
  std::unique_ptr<LoaderSource> source_;
  torch::Tensor sharpness_x_, sharpness_y_;
};

}  // namespace

TrainSummary run_training(const TrainConfig& config, Reporter* reporter) {
  config.validate();
  check_schedule(resolve_optimizer(config, 0).schedule, config.optimizer, config.warmup_epochs, config.epochs,
                 config.step_epochs);
  ClassificationTask task(config);
  return classification_summary(run_loop(task, reporter));
}

}  // namespace train
}  // namespace largebatch
