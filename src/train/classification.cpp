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
#include "run_loop.h"

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

void request_stop() { stop_flag() = true; }

// ------------------------------------------------------------------ config

std::string TrainConfig::to_json() const {
  json j;
  j["data"] = data;
  j["data-dir"] = data_dir;
  j["augment"] = augment;
  j["drop-last"] = drop_last;
  j["loader-workers"] = loader_workers;
  j["synthetic-size"] = synthetic_size;
  j["model"] = model;
  j["init"] = init;
  j["optimizer"] = optimizer;
  std::vector<std::string> opts;
  for (const auto& kv : optimizer_options) opts.push_back(kv.first + "=" + kv.second);
  j["opt"] = opts;
  j["lr"] = lr;
  j["weight-decay"] = weight_decay;
  j["schedule"] = schedule;
  j["warmup-epochs"] = warmup_epochs;
  j["lr-scaling"] = lr_scaling;
  j["final-ratio"] = final_ratio;
  j["batch-size"] = batch_size;
  j["micro-batch"] = micro_batch;
  j["eval-batch-size"] = eval_batch_size;
  j["val-split"] = val_split;
  j["epochs"] = epochs;
  j["seed"] = seed;
  j["threads"] = threads;
  j["device"] = device;
  j["out"] = out;
  j["telemetry-every"] = telemetry_every;
  j["sharpness-every"] = sharpness_every;
  j["sharpness-batch"] = sharpness_batch;
  j["sharpness-iterations"] = sharpness_iterations;
  j["progress"] = progress;
  j["plots"] = plots;
  j["sync-bn"] = sync_bn;
  j["channels-last"] = channels_last;
  j["cpu-kernels"] = cpu_kernels;
  j["on-nonfinite"] = on_nonfinite;
  j["skip-limit"] = skip_limit;
  j["checkpoint-every"] = checkpoint_every;
  j["dist-timeout"] = dist_timeout;
  j["bucket-mb"] = bucket_mb;
  return j.dump(2) + "\n";
}

TrainConfig TrainConfig::from_json(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for 1e99999
    usage(source + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object()) usage(source + ": expected a JSON object");
  TrainConfig c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& k = it.key();
    const json& v = it.value();
    auto str = [&]() {
      if (!v.is_string()) usage(source + ": '" + k + "' must be a string");
      return v.get<std::string>();
    };
    auto num = [&]() {
      if (!v.is_number()) usage(source + ": '" + k + "' must be a number");
      return v.get<double>();
    };
    auto integer = [&]() {
      if (!v.is_number_integer()) usage(source + ": '" + k + "' must be an integer");
      return v.get<int64_t>();
    };
    auto boolean = [&]() {
      if (!v.is_boolean()) usage(source + ": '" + k + "' must be true or false");
      return v.get<bool>();
    };
    if (k == "data") c.data = str();
    else if (k == "data-dir") c.data_dir = str();
    else if (k == "augment") c.augment = str();
    else if (k == "drop-last") c.drop_last = boolean();
    else if (k == "loader-workers") c.loader_workers = integer();
    else if (k == "synthetic-size") c.synthetic_size = integer();
    else if (k == "model") c.model = str();
    else if (k == "init") c.init = str();
    else if (k == "optimizer") c.optimizer = str();
    else if (k == "opt") {
      if (!v.is_array()) usage(source + ": 'opt' must be an array of \"key=value\" strings");
      for (const auto& item : v) {
        if (!item.is_string()) usage(source + ": 'opt' must be an array of \"key=value\" strings");
        for (const auto& kv : lo::parse_overrides(item.get<std::string>())) c.optimizer_options[kv.first] = kv.second;
      }
    } else if (k == "lr") c.lr = num();
    else if (k == "weight-decay") c.weight_decay = num();
    else if (k == "schedule") c.schedule = str();
    else if (k == "warmup-epochs") c.warmup_epochs = num();
    else if (k == "lr-scaling") c.lr_scaling = str();
    else if (k == "final-ratio") c.final_ratio = num();
    else if (k == "batch-size") c.batch_size = integer();
    else if (k == "micro-batch") c.micro_batch = integer();
    else if (k == "eval-batch-size") c.eval_batch_size = integer();
    else if (k == "val-split") c.val_split = integer();
    else if (k == "epochs") c.epochs = integer();
    else if (k == "seed") c.seed = static_cast<uint64_t>(integer());
    else if (k == "threads") c.threads = integer();
    else if (k == "device") c.device = str();
    else if (k == "out") c.out = str();
    else if (k == "telemetry-every") c.telemetry_every = integer();
    else if (k == "sharpness-every") c.sharpness_every = integer();
    else if (k == "sharpness-batch") c.sharpness_batch = integer();
    else if (k == "sharpness-iterations") c.sharpness_iterations = integer();
    else if (k == "progress") c.progress = str();
    else if (k == "plots") c.plots = boolean();
    else if (k == "sync-bn") c.sync_bn = boolean();
    else if (k == "channels-last") c.channels_last = boolean();
    else if (k == "cpu-kernels" || k == "small-map-kernels") c.cpu_kernels = boolean();  // the second: its name before max pooling joined
    else if (k == "on-nonfinite") c.on_nonfinite = str();
    else if (k == "skip-limit") c.skip_limit = integer();
    else if (k == "checkpoint-every") c.checkpoint_every = integer();
    else if (k == "dist-timeout") c.dist_timeout = num();
    else if (k == "bucket-mb") c.bucket_mb = num();
    else usage(source + ": unknown key '" + k + "'");
  }
  return c;
}

void TrainConfig::validate() const {
  const auto& datasets = data::dataset_names();
  if (std::find(datasets.begin(), datasets.end(), data) == datasets.end()) {
    std::string known;
    for (const auto& d : datasets) known += (known.empty() ? "" : ", ") + d;
    usage("--data: unknown data set '" + data + "' (known: " + known + ")");
  }
  const auto& models = models::model_names();
  if (std::find(models.begin(), models.end(), model) == models.end())
    usage("--model: unknown model '" + model + "'");
  const auto& inits = models::init_names();
  if (std::find(inits.begin(), inits.end(), init) == inits.end()) usage("--init: unknown method '" + init + "'");
  try {
    lo::find_recipe(optimizer);
  } catch (const std::invalid_argument& e) {
    usage(std::string("--optimizer: ") + e.what());
  }
  if (!one_of(augment, {"auto", "none", "flip", "crop-flip", "paper"}))
    usage("--augment: '" + augment + "' is not auto, none, flip, crop-flip or paper");
  if (!one_of(schedule, {"auto", "constant", "cosine", "warmup-cosine"}))
    usage("--schedule: '" + schedule + "' is not auto, constant, cosine or warmup-cosine");
  if (!one_of(lr_scaling, {"none", "linear", "sqrt"})) usage("--lr-scaling: '" + lr_scaling + "' is not none, linear or sqrt");
  if (!one_of(progress, {"auto", "bar", "lines", "none"})) usage("--progress: '" + progress + "' is not auto, bar, lines or none");
  if (batch_size <= 0) usage("--batch-size must be > 0, got " + std::to_string(batch_size));
  if (epochs <= 0) usage("--epochs must be > 0, got " + std::to_string(epochs));
  if (on_nonfinite != "stop" && on_nonfinite != "skip")
    usage("--on-nonfinite must be stop or skip, got '" + on_nonfinite + "'");
  if (skip_limit < 1) usage("--skip-limit must be >= 1, got " + std::to_string(skip_limit));
  if (checkpoint_every < 0) usage("--checkpoint-every must be >= 0 (0: at the end of each epoch), got " +
                                  std::to_string(checkpoint_every));
  if (micro_batch < 0) usage("--micro-batch must be >= 0, got " + std::to_string(micro_batch));
  if (micro_batch > batch_size)
    usage("--micro-batch " + std::to_string(micro_batch) + " is larger than --batch-size " + std::to_string(batch_size));
  if (micro_batch > 0 && batch_size % micro_batch != 0)
    usage("--micro-batch " + std::to_string(micro_batch) + " does not divide --batch-size " + std::to_string(batch_size));
  if (eval_batch_size <= 0) usage("--eval-batch-size must be > 0");
  if (val_split < 0) usage("--val-split must be >= 0, got " + std::to_string(val_split));
  if (loader_workers <= 0) usage("--loader-workers must be > 0");
  if (synthetic_size <= 0) usage("--synthetic-size must be > 0");
  if (threads < 0) usage("--threads must be >= 0");
  if (telemetry_every < 0) usage("--telemetry-every must be >= 0");
  if (sharpness_every < 0) usage("--sharpness-every must be >= 0");
  if (sharpness_batch <= 0) usage("--sharpness-batch must be > 0");
  if (sharpness_iterations <= 0) usage("--sharpness-iterations must be > 0");
  if (lr != -1 && !(lr >= 0 && std::isfinite(lr))) usage("--lr must be finite and >= 0");
  if (weight_decay != -1 && !(weight_decay >= 0 && std::isfinite(weight_decay))) usage("--weight-decay must be >= 0");
  if (!(warmup_epochs >= 0)) usage("--warmup-epochs must be >= 0");
  if (!(final_ratio >= 0 && final_ratio <= 1)) usage("--final-ratio must be in [0, 1]");
  if (out.empty()) usage("--out must not be empty");
  if (!(dist_timeout > 0 && std::isfinite(dist_timeout))) usage("--dist-timeout must be > 0 seconds");
  if (!(bucket_mb > 0 && std::isfinite(bucket_mb))) usage("--bucket-mb must be > 0");
  if (!(device == "cpu" || device.rfind("cuda", 0) == 0)) usage("--device: '" + device + "' is not cpu or cuda[:N]");
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
Evaluation evaluate(models::ClassifierImpl& model, const data::ImageDataset& set, int64_t batch_size,
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
    LoopOptions o;
    o.command = "train";
    o.out = c_.out;
    o.resume = c_.resume;
    o.epochs = c_.epochs;
    o.batch_size = c_.batch_size;
    o.micro_batch = c_.micro_batch;
    o.seed = c_.seed;
    o.threads = c_.threads;
    o.device = c_.device;
    o.checkpoint_every = c_.checkpoint_every;
    o.telemetry_every = c_.telemetry_every;
    o.sharpness_every = c_.sharpness_every;
    o.sharpness_iterations = c_.sharpness_iterations;
    o.on_nonfinite = c_.on_nonfinite;
    o.skip_limit = c_.skip_limit;
    o.plots = c_.plots;
    o.sync_bn = c_.sync_bn;
    o.dist_timeout = c_.dist_timeout;
    o.bucket_mb = c_.bucket_mb;
    o.inject_nonfinite_gradient_at = c_.inject_nonfinite_gradient_at;
    o.crash_after_step = c_.crash_after_step;
    return o;
  }

  void check_resume(const std::string& saved, const fs::path& out) const override {
    const TrainConfig before = TrainConfig::from_json(saved, (out / "config.json").string());
    require_same_on_resume("--data", c_.data, before.data, out);
    require_same_on_resume("--model", c_.model, before.model, out);
    require_same_on_resume("--optimizer", c_.optimizer, before.optimizer, out);
    require_same_on_resume("--batch-size", c_.batch_size, before.batch_size, out);
    require_same_on_resume("--seed", c_.seed, before.seed, out);
    require_same_on_resume("--val-split", c_.val_split, before.val_split, out);
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
        usage(std::string("--val-split: ") + e.what());
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
    o.rank = place.rank;
    o.world = place.world;
    source_ = std::make_unique<LoaderSource>(train_set, o);
    if (source_->batches_per_epoch() == 0)
      usage("--batch-size " + std::to_string(c_.batch_size) + " with --drop-last leaves no batch");
    const int64_t last_batch = train_set.size() % c_.batch_size;
    if (place.world > 1 && !c_.drop_last && last_batch > 0 && last_batch < place.world)
      usage("the last batch of an epoch has " + std::to_string(last_batch) + " image(s), fewer than the " +
            std::to_string(place.world) + " ranks; pass --drop-last or change --batch-size");
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
    lo::ScheduleOptions so;
    so.scaling = lo::parse_lr_scaling(c_.lr_scaling);
    so.warmup_steps = std::llround(c_.warmup_epochs * static_cast<double>(steps_per_epoch));
    so.total_steps = total_steps;
    so.final_ratio = c_.final_ratio;
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

  std::vector<double> forward_backward(const data::Batch& batch, int64_t start, int64_t length,
                                       double loss_divisor) override {
    const auto x = batch.images.narrow(0, start, length).to(place_.device);
    const auto y = batch.labels.narrow(0, start, length).to(place_.device);
    const auto logits = model_->forward(x);
    const auto loss_sum = torch::nn::functional::cross_entropy(
        logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
    (loss_sum / loss_divisor).backward();
    return {loss_sum.item<double>(), static_cast<double>(logits.argmax(1).eq(y).sum().item<int64_t>())};
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
    const Evaluation test = evaluate(*model_, split_.test, c_.eval_batch_size, place_.device, comm);
    r.test_loss = test.loss;
    r.test_top1 = test.top1;
    r.test_top5 = test.top5;
    if (c_.val_split > 0) {
      const Evaluation val = evaluate(*model_, validation_, c_.eval_batch_size, place_.device, comm);
      r.val_loss = val.loss;
      r.val_top1 = val.top1;
      r.val_top5 = val.top5;
    }
    return record_json(r);
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
  if (resolve_optimizer(config, 0).schedule == "warmup-cosine" && config.warmup_epochs > static_cast<double>(config.epochs)) {
    std::ostringstream msg;
    msg << "--warmup-epochs " << config.warmup_epochs << " is longer than --epochs " << config.epochs
        << " (the " << config.optimizer << " schedule is warmup-cosine)";
    usage(msg.str());
  }
  ClassificationTask task(config);
  return classification_summary(run_loop(task, reporter));
}

}  // namespace train
}  // namespace largebatch
