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

#include "run_support.h"

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

namespace {

}  // namespace

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

// ------------------------------------------------------------------ training

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

// Sums over this rank's shard of the test set: loss, top-1 hits, top-5 hits, images.
struct EvaluationSums {
  double loss_sum = 0, correct1 = 0, correct5 = 0, n = 0;
};

EvaluationSums evaluate_shard(models::ClassifierImpl& model, const data::ImageDataset& test, int64_t batch_size,
                              torch::Device device, int64_t rank, int64_t world) {
  torch::NoGradGuard no_grad;
  model.eval();
  data::LoaderOptions lo_opts;
  lo_opts.shuffle = false;
  lo_opts.workers = 1;
  // Every rank takes its shard of every evaluation batch (the global batch rounded up to a multiple of world).
  lo_opts.batch_size = (batch_size + world - 1) / world * world;
  lo_opts.rank = rank;
  lo_opts.world = world;
  data::BatchLoader loader(test, lo_opts);
  loader.start_epoch(0);
  data::Batch batch;
  double loss_sum = 0;
  int64_t correct1 = 0, correct5 = 0, n = 0;
  const int64_t k = std::min<int64_t>(5, test.num_classes);
  while (loader.next(batch)) {
    if (batch.labels.size(0) == 0) continue;
    auto x = batch.images.to(device), y = batch.labels.to(device);
    auto logits = model.forward(x);
    loss_sum += torch::nn::functional::cross_entropy(
                    logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum))
                    .item<double>();
    auto topk = std::get<1>(logits.topk(k, 1));
    auto hits = topk.eq(y.unsqueeze(1));
    correct1 += hits.select(1, 0).sum().item<int64_t>();
    correct5 += hits.any(1).sum().item<int64_t>();
    n += y.size(0);
  }
  model.train();
  return {loss_sum, static_cast<double>(correct1), static_cast<double>(correct5), static_cast<double>(n)};
}

// The whole test set's metrics: each rank evaluates its shard and the sums are added over ranks, so every
// test image counts exactly once.
Evaluation evaluate(models::ClassifierImpl& model, const data::ImageDataset& test, int64_t batch_size,
                    torch::Device device, dist::Communicator* comm) {
  const int64_t rank = comm ? comm->rank() : 0, world = comm ? comm->world() : 1;
  EvaluationSums s = evaluate_shard(model, test, batch_size, device, rank, world);
  if (comm) {
    auto t = torch::tensor({s.loss_sum, s.correct1, s.correct5, s.n}, torch::kFloat64);
    dist::guarded(*comm, [&] { comm->all_reduce_sum(t); });
    s = {t[0].item<double>(), t[1].item<double>(), t[2].item<double>(), t[3].item<double>()};
  }
  Evaluation e;
  e.loss = s.loss_sum / s.n;
  e.top1 = s.correct1 / s.n;
  e.top5 = s.correct5 / s.n;
  return e;
}

// The best test epoch, and with a validation split the epoch selected on it (the first of equal ones).
void note_best_epochs(TrainSummary& summary, const EpochRecord& r) {
  if (r.test_top1 > summary.best_test_top1) {
    summary.best_test_top1 = r.test_top1;
    summary.best_epoch = r.epoch;
  }
  if (std::isfinite(r.val_top1) && (summary.selected_epoch == 0 || r.val_top1 > summary.selected_val_top1)) {
    summary.selected_epoch = r.epoch;
    summary.selected_val_top1 = r.val_top1;
    summary.selected_test_top1 = r.test_top1;
  }
}

void write_summary(const fs::path& out, const TrainSummary& s, const TrainConfig& c, const json& resolved_optimizer) {
  json j{{"status", s.status},
         {"message", s.message},
         {"epochs_done", s.epochs_done},
         {"steps", s.steps},
         {"final_test_top1", s.final_test_top1},
         {"best_test_top1", s.best_test_top1},
         {"best_epoch", s.best_epoch},
         {"val_split", c.val_split},
         {"selected_epoch", s.selected_epoch},  // on validation (0: no split)
         {"selected_val_top1", s.selected_val_top1},
         {"selected_test_top1", s.selected_test_top1},
         {"wall_seconds", s.wall_seconds},
         {"optimizer", c.optimizer},
         {"model", c.model},
         {"data", c.data},
         {"batch_size", c.batch_size},
         {"world_size", s.world_size},
         {"replica_mismatches", s.replica_mismatches},
         {"skipped_steps", s.skipped_steps},
         {"optimizer_resolved", resolved_optimizer}};
  write_atomically(out / "summary.json", j.dump(2) + "\n");
}

}  // namespace

TrainSummary run_training(const TrainConfig& config) {
  // A stop request from here on (data loading and restoring included) is kept: the loop stops after its first step.
  stop_flag() = false;
  const auto t_start = Clock::now();
  config.validate();
  (void)optim::fused_step_instruction_set();  // a bad LARGEBATCH_STEP_SIMD is refused before any work
  if (resolve_optimizer(config, 0).schedule == "warmup-cosine" && config.warmup_epochs > static_cast<double>(config.epochs)) {
    std::ostringstream msg;
    msg << "--warmup-epochs " << config.warmup_epochs << " is longer than --epochs " << config.epochs
        << " (the " << config.optimizer << " schedule is warmup-cosine)";
    usage(msg.str());
  }
  set_threads(config.threads);
  const torch::Device device = parse_device(config.device);
  const fs::path out(config.out);

  // Data parallelism: the launcher's environment says where this process sits; --batch-size is global.
  dist::LaunchEnv env;
  try {
    env = dist::launch_env_from_environment();
  } catch (const std::invalid_argument& e) {
    usage(e.what());
  }
  const int64_t world = env.world;
  const bool lead = env.rank == 0;  // only rank 0 writes files and shows progress
  if (config.batch_size % world != 0)
    usage("--batch-size " + std::to_string(config.batch_size) + " is not divisible by the world size " +
          std::to_string(world) + " (WORLD_SIZE)");
  const int64_t local_batch = config.batch_size / world;
  if (config.micro_batch > 0 && local_batch % config.micro_batch != 0)
    usage("--micro-batch " + std::to_string(config.micro_batch) + " does not divide the per-rank batch " +
          std::to_string(local_batch) + " (--batch-size / WORLD_SIZE)");
  const fs::path checkpoint_path = out / "checkpoint.pt";

  // Never overwrite a previous run's results; a resume needs the same identity.
  const bool resuming = prepare_output_dir(out, config.resume, lead, [&](const std::string& saved) {
    const TrainConfig before = TrainConfig::from_json(saved, (out / "config.json").string());
    require_same_on_resume("--data", config.data, before.data, out);
    require_same_on_resume("--model", config.model, before.model, out);
    require_same_on_resume("--optimizer", config.optimizer, before.optimizer, out);
    require_same_on_resume("--batch-size", config.batch_size, before.batch_size, out);
    require_same_on_resume("--seed", config.seed, before.seed, out);
    require_same_on_resume("--val-split", config.val_split, before.val_split, out);
  });

  // Data, model, optimizer, schedule.
  data::DatasetSplit split = load_data(config.data, config.data_dir, config.synthetic_size, config.seed);
  data::ImageDataset validation;  // --val-split's images, taken out of the training set
  if (config.val_split > 0) {
    try {
      auto held = data::hold_out(split.train, config.val_split);
      split.train = std::move(held.train);
      validation = std::move(held.validation);
    } catch (const std::invalid_argument& e) {
      usage(std::string("--val-split: ") + e.what());
    }
  }
  const auto& train_set = split.train;
  auto model = make_classifier(config.model, train_set, config.init, config.seed, train_set.num_classes);
  model->set_channels_last(config.channels_last);
  model->set_cpu_kernels(config.cpu_kernels);
  model->to(device);

  std::shared_ptr<dist::Communicator> comm;
  models::CrossRankSum cross_rank_sum;
  if (env.distributed())
    comm = connect_ranks(env, device, config.dist_timeout, config.sync_bn, *model, &cross_rank_sum);

  data::LoaderOptions loader_options;
  loader_options.batch_size = config.batch_size;
  loader_options.shuffle = true;
  loader_options.drop_last = config.drop_last;
  loader_options.seed = config.seed;
  loader_options.workers = config.loader_workers;
  loader_options.prefetch = 2;
  loader_options.augment = data::augment_preset(config.augment, config.data);  // checked by validate()
  loader_options.rank = env.rank;
  loader_options.world = world;
  data::BatchLoader loader(train_set, loader_options);
  const int64_t steps_per_epoch = loader.batches_per_epoch();
  if (steps_per_epoch == 0) usage("--batch-size " + std::to_string(config.batch_size) + " with --drop-last leaves no batch");
  const int64_t total_steps = config.epochs * steps_per_epoch;
  const int64_t last_batch = train_set.size() % config.batch_size;
  if (world > 1 && !config.drop_last && last_batch > 0 && last_batch < world)
    usage("the last batch of an epoch has " + std::to_string(last_batch) + " image(s), fewer than the " +
          std::to_string(world) + " ranks; pass --drop-last or change --batch-size");

  const lo::ResolvedRecipe recipe = resolve_optimizer(config, total_steps);
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  try {
    optimizer = lo::make_optimizer({recipe.optimizer, recipe.lr, config.batch_size, recipe.options},
                                   model->named_parameters());
  } catch (const std::invalid_argument& e) {
    usage(std::string("--opt: ") + e.what());
  }
  auto* layerwise = dynamic_cast<lo::LayerwiseOptimizer*>(optimizer.get());
  // The trainer keeps the last step's trust ratios to name the culprit layer if the loss diverges.
  if (layerwise) layerwise->set_telemetry(true);


  lo::ScheduleOptions so;
  so.kind = lo::parse_schedule_kind(recipe.schedule);
  so.lr = recipe.lr;
  so.scaling = lo::parse_lr_scaling(config.lr_scaling);
  so.batch_size = config.batch_size;
  so.warmup_steps = so.kind == lo::ScheduleKind::kWarmupCosine
                        ? std::min<int64_t>(total_steps, std::llround(config.warmup_epochs * steps_per_epoch))
                        : 0;
  so.total_steps = total_steps;
  so.final_ratio = config.final_ratio;
  const lo::LrSchedule schedule(so);
  const c10::optional<lo::TimeVarying> tv =
      layerwise ? static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).time_varying()
                : c10::nullopt;

  TrainSummary summary;
  int64_t start_epoch = 0, step = 0;
  // Where a checkpoint taken within an epoch left it: its batches done and the sums of its metrics so far.
  json within_epoch = json::object();
  int64_t resumed_skips_in_a_row = 0;
  if (resuming) {
    const json meta = load_checkpoint(checkpoint_path, *model, *optimizer, device);
    start_epoch = meta.at("epoch");
    step = meta.at("step");
    within_epoch = within_epoch_of(meta, steps_per_epoch, checkpoint_path);
    resumed_skips_in_a_row = meta.value("skipped_in_a_row", int64_t{0});
    summary.skipped_steps = meta.value("skipped_steps", int64_t{0});
    for (const auto& r : meta.at("history")) summary.history.push_back(record_from(r));
    // Rewrite metrics.csv from the checkpoint: rows of epochs after it (if any) are dropped.
    if (lead) {
      std::string rows = metrics_header();
      for (const auto& r : summary.history) rows += metrics_row(r);
      write_atomically(out / "metrics.csv", rows);
      print_resumed(out, start_epoch, within_epoch, step);
    }
  } else if (lead) {
    write_atomically(out / "metrics.csv", metrics_header());
  }
  require_same_resume_point(comm.get(), resuming, step, out);
  // config.json records the learning rate used (a recipe's default resolved), so that it alone rebuilds the run.
  TrainConfig recorded = config;
  recorded.lr = recipe.lr;
  if (lead) write_atomically(out / "config.json", recorded.to_json());
  // Every rank starts from rank 0's parameters and buffers (fresh or resumed), then gradients are averaged
  // in buckets that overlap backward.
  std::unique_ptr<dist::GradientAverager> averager;
  if (comm) {
    dist::broadcast_module(*model, *comm);
    std::vector<torch::Tensor> trainable;
    for (auto& p : model->parameters())
      if (p.requires_grad()) trainable.push_back(p);
    averager = std::make_unique<dist::GradientAverager>(trainable, comm,
                                                        std::llround(config.bucket_mb * 1024 * 1024));
  }

  std::ofstream telemetry;
  if (config.telemetry_every > 0 && lead) {
    open_telemetry(telemetry, out / "telemetry.csv", resuming, step);
    if (!layerwise) std::printf("note: --telemetry-every records layer-wise optimizers only; %s has no trust ratio\n",
                                config.optimizer.c_str());
  }

  // Sharpness: a fixed batch (the first training images, unaugmented), estimated after every N steps. Every
  // rank computes it (identical replicas, same batch, no collective: BatchNorm is made local for it), so no
  // rank waits in a collective meanwhile; rank 0 writes it.
  std::ofstream sharpness_log;
  data::Batch sharpness_batch;
  if (config.sharpness_every > 0) {
    data::LoaderOptions so_opts;
    so_opts.batch_size = std::min(config.sharpness_batch, train_set.size());
    so_opts.shuffle = false;
    data::BatchLoader first(train_set, so_opts);
    first.start_epoch(0);
    first.next(sharpness_batch);
    if (lead)
      open_csv_log(sharpness_log, out / "sharpness.csv", "step,epoch,top_eigenvalue,iterations,converged,seconds",
                   resuming, step + 1, "--sharpness-every");
  }
  auto measure_sharpness = [&](int64_t epoch) {
    const auto t0 = Clock::now();
    // Training-mode forward (the loss being minimised) without disturbing BatchNorm's running statistics or
    // the random stream (dropout draws from it).
    std::vector<torch::Tensor> saved;
    for (const auto& b : model->buffers()) saved.push_back(b.detach().clone());
    torch::Tensor rng_state;
    {
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      rng_state = gen.get_state();
    }
    if (comm && config.sync_bn) models::synchronise_batchnorm(*model, {});
    std::vector<torch::Tensor> params;
    for (const auto& p : model->parameters())
      if (p.requires_grad()) params.push_back(p);
    const auto x = sharpness_batch.images.to(device), y = sharpness_batch.labels.to(device);
    SharpnessOptions so;
    so.max_iterations = config.sharpness_iterations;
    so.seed = config.seed;
    const auto e = top_hessian_eigenvalue(
        [&] { return torch::nn::functional::cross_entropy(model->forward(x), y); }, params, so);
    if (comm && config.sync_bn) models::synchronise_batchnorm(*model, cross_rank_sum);
    {
      torch::NoGradGuard no_grad;
      size_t i = 0;
      for (auto& b : model->buffers()) b.copy_(saved[i++]);
      auto gen = at::detail::getDefaultCPUGenerator();
      std::lock_guard<std::mutex> lock(gen.mutex());
      gen.set_state(rng_state);
    }
    const double seconds = seconds_since(t0);
    if (!sharpness_log.is_open()) return seconds;
    sharpness_log << step << "," << epoch + 1 << "," << format("%.9g", e.eigenvalue) << "," << e.iterations << ","
                  << (e.converged ? 1 : 0) << "," << format("%.3f", seconds) << "\n";
    sharpness_log.flush();
    return seconds;
  };

  if (lead) std::printf("largebatch train: %s (%lld train / %lld test) | %s (%lld parameters) | %s lr %.4g (%s schedule) | "
              "batch %lld%s | %lld epochs x %lld steps | %s\n",
              config.data.c_str(), static_cast<long long>(train_set.size()),
              static_cast<long long>(split.test.size()), config.model.c_str(),
              static_cast<long long>(models::parameter_count(*model)), config.optimizer.c_str(), recipe.lr,
              recipe.schedule.c_str(), static_cast<long long>(config.batch_size),
              config.micro_batch > 0 ? (" (micro-batches of " + std::to_string(config.micro_batch) + ")").c_str() : "",
              static_cast<long long>(config.epochs), static_cast<long long>(steps_per_epoch), out.string().c_str());
  if (lead && comm)
    std::printf("data parallel: %lld ranks over %s (launch: %s), %lld images per rank and step, %s BatchNorm, "
                "%lld gradient buckets\n",
                static_cast<long long>(world), comm->backend().c_str(), env.source.c_str(),
                static_cast<long long>(local_batch), config.sync_bn ? "synchronised" : "per-rank",
                static_cast<long long>(averager->bucket_count()));
  if (lead && layerwise) std::printf("optimizer options: %s\n", static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).describe().c_str());
  std::fflush(stdout);

  Progress progress(lead ? config.progress : "none", config.epochs, steps_per_epoch);
  summary.status = "completed";
  for (const auto& r : summary.history) note_best_epochs(summary, r);

  model->train();
  int64_t skipped_in_a_row = resumed_skips_in_a_row;
  auto last_checkpoint = [&] { return fs::exists(checkpoint_path) ? checkpoint_path.string() : std::string("none"); };
  auto interrupted = [&] {
    summary.status = "interrupted";
    summary.message = "stopped by a signal at step " + std::to_string(step) + "; resume from " +
                      (fs::exists(checkpoint_path) ? checkpoint_path.string() : "the start (no checkpoint yet)");
  };
  // The checkpoint's record of the run so far; `within` describes an unfinished epoch (empty at its end).
  auto checkpoint_meta = [&](int64_t epoch, const json& within) {
    json meta{{"epoch", epoch},
              {"step", step},
              {"skipped_steps", summary.skipped_steps},
              {"skipped_in_a_row", skipped_in_a_row},  // --skip-limit counts across epochs
              {"history", json::array()}};
    for (const auto& h : summary.history) meta["history"].push_back(record_json(h));
    if (!within.empty()) meta["within_epoch"] = within;
    return meta;
  };
  for (int64_t epoch = start_epoch; epoch < config.epochs; ++epoch) {
    const double wait_before = loader.wait_seconds();
    // A resumed epoch continues from the checkpoint's batch with its sums (JSON keeps doubles exactly).
    const json resumed = epoch == start_epoch ? within_epoch : json::object();
    int64_t index = resumed.value("batch", int64_t{0});
    loader.start_epoch(epoch, index);
    data::Batch batch;
    double loss_sum = resumed.value("loss_sum", 0.0);
    int64_t correct = resumed.value("correct", int64_t{0}), seen = resumed.value("seen", int64_t{0});
    double lr_t = resumed.value("lr", 0.0), phi_t = resumed.value("phi", 1.0);
    double compute_s = resumed.value("compute_s", 0.0), allreduce_s = resumed.value("allreduce_s", 0.0),
           optimizer_s = resumed.value("optimizer_s", 0.0), sharpness_s = resumed.value("sharpness_s", 0.0);
    const auto t_epoch = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(resumed.value("elapsed_s", 0.0)));
    auto within_this_epoch = [&] {
      return json{{"batch", index},          {"loss_sum", loss_sum},       {"correct", correct},
                  {"seen", seen},            {"lr", lr_t},                 {"phi", phi_t},
                  {"compute_s", compute_s},  {"allreduce_s", allreduce_s}, {"optimizer_s", optimizer_s},
                  {"sharpness_s", sharpness_s}, {"elapsed_s", seconds_since(t_epoch)}};
    };
    // After a step (taken or skipped): a checkpoint within the epoch when one is due or a stop was asked for
    // (a stop after the epoch's last batch too: the resumed run then starts with the evaluation), then the
    // test crash hook.
    auto after_step = [&](bool stopping) {
      if (lead && checkpoint_within_epoch_due(config.checkpoint_every, step, index, steps_per_epoch, stopping)) {
        if (telemetry.is_open()) telemetry.flush();  // the rows the checkpoint covers are on disk before it
        save_checkpoint(checkpoint_path, *model, *optimizer, checkpoint_meta(epoch, within_this_epoch()));
      }
      if (config.crash_after_step >= 0 && step > config.crash_after_step)
        throw SimulatedCrash("simulated crash after step " + std::to_string(config.crash_after_step));
    };
    while (loader.next(batch)) {
      lr_t = schedule.at(step);
      phi_t = tv ? lo::tv_phi(*tv, step) : 1.0;
      lo::set_learning_rate(*optimizer, lr_t);
      auto t_phase = Clock::now();
      if (averager) averager->zero_grad();
      else optimizer->zero_grad();
      const int64_t b = batch.labels.size(0);  // this rank's shard
      // The step's global batch (the last one of an epoch may be partial).
      const int64_t global_b = std::min(config.batch_size, train_set.size() - batch.index * config.batch_size);
      const int64_t micro = config.micro_batch > 0 ? config.micro_batch : b;
      double local_loss_sum = 0;
      int64_t local_correct = 0;
      // Gradient accumulation: each micro-batch's summed loss is divided by the global batch (times the world
      // size, which the all-reduce average divides out), so the gradient is the mean over the global batch
      // whatever the shard sizes. BatchNorm statistics are per micro-batch (and per rank unless --sync-bn).
      for (int64_t start = 0; start < b; start += micro) {
        const int64_t len = std::min(micro, b - start);
        auto x = batch.images.narrow(0, start, len).to(device);
        auto y = batch.labels.narrow(0, start, len).to(device);
        if (averager) averager->set_last_backward(start + len >= b);
        auto logits = model->forward(x);
        auto loss_sum_t = torch::nn::functional::cross_entropy(
            logits, y, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kSum));
        (loss_sum_t / (static_cast<double>(global_b) / static_cast<double>(world))).backward();
        local_loss_sum += loss_sum_t.item<double>();
        local_correct += logits.argmax(1).eq(y).sum().item<int64_t>();
      }
      compute_s += seconds_since(t_phase);
      t_phase = Clock::now();
      // Loss, accuracy and a stop request are agreed by every rank, so all of them take the same decisions.
      double batch_loss = local_loss_sum / static_cast<double>(global_b);
      int64_t batch_correct = local_correct;
      bool stop_now = stop_flag();
      if (comm) {
        averager->finish();
        auto agreed = torch::tensor({local_loss_sum, static_cast<double>(local_correct), stop_now ? 1.0 : 0.0},
                                    torch::kFloat64);
        dist::guarded(*comm, [&] { comm->all_reduce_sum(agreed); });
        batch_loss = agreed[0].item<double>() / static_cast<double>(global_b);
        batch_correct = static_cast<int64_t>(std::llround(agreed[1].item<double>()));
        stop_now = agreed[2].item<double>() > 0;
      }
      allreduce_s += seconds_since(t_phase);
      // Non-finite loss or gradient (the gradients are the averaged ones: every rank sees the same and decides
      // alike). One host read per step for all gradients.
      if (std::find(config.inject_nonfinite_gradient_at.begin(), config.inject_nonfinite_gradient_at.end(), step) !=
          config.inject_nonfinite_gradient_at.end()) {
        torch::NoGradGuard no_grad;
        for (auto& p : model->parameters())
          if (p.grad().defined()) {
            p.mutable_grad().view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
            break;
          }
      }
      std::string nonfinite;
      if (!std::isfinite(batch_loss)) {
        nonfinite = format("non-finite loss (%g)", batch_loss);
      } else if (const std::string layer = first_nonfinite_gradient(*model); !layer.empty()) {
        nonfinite = "non-finite gradient in " + layer;
      }
      if (!nonfinite.empty() && config.on_nonfinite == "stop") {
        std::ostringstream msg;
        msg << nonfinite << " at step " << step << " (epoch " << epoch + 1 << ")";
        msg << largest_trust_ratio(layerwise);
        msg << "; the last good checkpoint is " << last_checkpoint() << " (--on-nonfinite skip drops such steps instead)";
        summary.status = "diverged";
        summary.message = msg.str();
        break;
      }
      if (!nonfinite.empty()) {
        // Skipping cannot recover from weights that are already NaN or infinite, nor from a run that keeps failing.
        const std::string bad_weights = first_nonfinite_parameter(*model);
        std::string hopeless;
        if (!bad_weights.empty())
          hopeless = "the weights of " + bad_weights + " are no longer finite";
        else if (skipped_in_a_row + 1 >= config.skip_limit)
          hopeless = std::to_string(skipped_in_a_row + 1) + " steps skipped in a row (--skip-limit " +
                     std::to_string(config.skip_limit) + ")";
        if (!hopeless.empty()) {
          summary.status = "diverged";
          summary.message = nonfinite + " at step " + std::to_string(step) + ": " + hopeless +
                            ", the run cannot recover; the last good checkpoint is " + last_checkpoint();
          break;
        }
        // As gradient scalers do: no update, no optimizer state change; the batch counts as consumed.
        ++skipped_in_a_row;
        ++summary.skipped_steps;
        if (lead)
          std::fprintf(stderr, "largebatch train: step %lld: %s, step skipped (%lld so far)\n",
                       static_cast<long long>(step), nonfinite.c_str(), static_cast<long long>(summary.skipped_steps));
        ++step;
        ++index;
        after_step(stop_now);
        if (stop_now) {
          interrupted();
          break;
        }
        continue;
      }
      skipped_in_a_row = 0;
      t_phase = Clock::now();
      optimizer->step();
      optimizer_s += seconds_since(t_phase);
      if (telemetry.is_open() && layerwise && step % config.telemetry_every == 0)
        write_telemetry(telemetry, step, layerwise->last_telemetry());
      ++step;
      if (config.sharpness_every > 0 && step % config.sharpness_every == 0) sharpness_s += measure_sharpness(epoch);
      loss_sum += batch_loss * static_cast<double>(global_b);
      correct += batch_correct;
      seen += global_b;
      progress.step(epoch, index++,
                    format("loss %.4f acc %.4f %.0f img/s", loss_sum / static_cast<double>(seen),
                           static_cast<double>(correct) / static_cast<double>(seen),
                           static_cast<double>(seen) / seconds_since(t_epoch)));
      after_step(stop_now);
      if (stop_now) {
        interrupted();
        break;
      }
    }
    if (summary.status != "completed") break;
    if (telemetry.is_open()) telemetry.flush();
    const double train_seconds = seconds_since(t_epoch) - sharpness_s;  // images/s of training alone

    // Without --sync-bn each rank's BatchNorm running statistics saw only its shards: evaluate (and save)
    // rank 0's, as DistributedDataParallel does by broadcasting buffers.
    if (comm) dist::broadcast_buffers(*model, *comm);
    const Evaluation ev = evaluate(*model, split.test, config.eval_batch_size, device, comm.get());
    EpochRecord r;
    r.epoch = epoch + 1;
    r.step = step;
    r.lr = lr_t;
    r.phi = phi_t;
    r.train_loss = seen ? loss_sum / static_cast<double>(seen) : NAN;  // NaN: every step of the epoch skipped
    r.train_acc = seen ? static_cast<double>(correct) / static_cast<double>(seen) : NAN;
    r.test_loss = ev.loss;
    r.test_top1 = ev.top1;
    r.test_top5 = ev.top5;
    if (config.val_split > 0) {
      const Evaluation val = evaluate(*model, validation, config.eval_batch_size, device, comm.get());
      r.val_loss = val.loss;
      r.val_top1 = val.top1;
      r.val_top5 = val.top5;
    }
    r.epoch_seconds = seconds_since(t_epoch);
    r.images_per_second = static_cast<double>(seen) / train_seconds;
    r.data_wait_seconds = loader.wait_seconds() - wait_before;
    r.compute_seconds = compute_s;
    r.allreduce_seconds = allreduce_s;
    r.optimizer_seconds = optimizer_s;
    summary.history.push_back(r);
    note_best_epochs(summary, r);

    // Checkpoint first, then the metrics row: the CSV never runs ahead of what can be resumed.
    if (lead) {
      save_checkpoint(checkpoint_path, *model, *optimizer, checkpoint_meta(epoch + 1, json::object()));
      append_line(out / "metrics.csv", metrics_row(r));
    }
    progress.epoch_line(format(
        "epoch %3lld/%lld  step %6lld  lr %.4g  phi %.4f  train loss %.4f acc %.4f  %stest loss %.4f top1 %.4f "
        "top5 %.4f  %.1fs %.0f img/s",
        static_cast<long long>(r.epoch), static_cast<long long>(config.epochs), static_cast<long long>(r.step), r.lr,
        r.phi, r.train_loss, r.train_acc,
        config.val_split > 0 ? format("val loss %.4f top1 %.4f  ", r.val_loss, r.val_top1).c_str() : "",
        r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds, r.images_per_second));
  }

  summary.steps = step;
  summary.epochs_done = summary.history.empty() ? 0 : summary.history.back().epoch;
  summary.final_test_top1 = summary.history.empty() ? 0 : summary.history.back().test_top1;
  summary.wall_seconds = seconds_since(t_start);
  summary.world_size = world;
  summary.rank = env.rank;
  if (comm) {
    // Replicas must be bit-identical; the final barrier keeps rank 0 (host of the rendezvous store) alive
    // until everyone is done with collectives.
    summary.replica_mismatches = replica_mismatches(*model, *comm, lead);
    dist::guarded(*comm, [&] { comm->barrier(); });
  }
  if (!lead) return summary;
  if (summary.status == "completed") {
    save_module(out / "model.pt", *model);
  }
  write_summary(out, summary, config, resolved_optimizer_json(recipe, *optimizer, so.warmup_steps, total_steps));
  if (config.plots) {
    telemetry.close();
    const auto made = report::plot_run(out.string());
    if (made.empty() && !report::gnuplot_available() && config.progress != "none")
      std::printf("note: gnuplot is not installed; plots skipped (CSV files are complete)\n");
  }
  return summary;
}

}  // namespace train
}  // namespace largebatch
