// `largebatch pretrain` (Barlow Twins) and `largebatch linear-eval`. See include/largebatch/train/self_supervised.h.
#include <largebatch/optim/layerwise.h>
#include <largebatch/train/self_supervised.h>

#include <largebatch/data/pipeline.h>
#include <largebatch/dist/dist.h>
#include <largebatch/models/models.h>
#include <largebatch/optim/factory.h>
#include <largebatch/optim/schedule.h>
#include <largebatch/report/plot.h>
#include <largebatch/train/barlow_twins.h>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "run_support.h"

namespace fs = std::filesystem;
namespace lo = largebatch::optim;
using nlohmann::json;
using namespace largebatch::train::detail;

namespace largebatch {
namespace train {

namespace {

// ------------------------------------------------------------------ config files
// Each config lists its fields once (name, member); JSON writing and reading both walk that list.

struct JsonWriter {
  json& j;
  template <class T>
  void operator()(const char* key, const T& value) { j[key] = value; }
  void operator()(const char* key, const std::map<std::string, std::string>& options) {
    std::vector<std::string> items;
    for (const auto& kv : options) items.push_back(kv.first + "=" + kv.second);
    j[key] = items;
  }
};

struct JsonReader {
  const std::string& key;  // the key being read
  const json& v;
  const std::string& source;
  bool matched = false;
  void wrong(const char* key_name, const char* what) {
    usage(source + ": '" + key_name + "' must be " + what);
  }
  void operator()(const char* k, std::string& x) {
    if (key != k) return;
    if (!v.is_string()) wrong(k, "a string");
    x = v.get<std::string>();
    matched = true;
  }
  void operator()(const char* k, double& x) {
    if (key != k) return;
    if (!v.is_number()) wrong(k, "a number");
    x = v.get<double>();
    matched = true;
  }
  void operator()(const char* k, int64_t& x) {
    if (key != k) return;
    if (!v.is_number_integer()) wrong(k, "an integer");
    x = v.get<int64_t>();
    matched = true;
  }
  void operator()(const char* k, uint64_t& x) {
    if (key != k) return;
    if (!v.is_number_integer() || v.get<int64_t>() < 0) wrong(k, "a non-negative integer");
    x = v.get<uint64_t>();
    matched = true;
  }
  void operator()(const char* k, bool& x) {
    if (key != k) return;
    if (!v.is_boolean()) wrong(k, "true or false");
    x = v.get<bool>();
    matched = true;
  }
  void operator()(const char* k, std::map<std::string, std::string>& x) {
    if (key != k) return;
    if (!v.is_array()) wrong(k, "an array of \"key=value\" strings");
    for (const auto& item : v) {
      if (!item.is_string()) wrong(k, "an array of \"key=value\" strings");
      try {
        for (const auto& kv : lo::parse_overrides(item.get<std::string>())) x[kv.first] = kv.second;
      } catch (const std::invalid_argument& e) {
        usage(source + ": '" + k + "': " + e.what());
      }
    }
    matched = true;
  }
};

template <class Config, class Visitor>
void pretrain_fields(Config& c, Visitor&& v) {
  v("data", c.data);
  v("data-dir", c.data_dir);
  v("loader-workers", c.loader_workers);
  v("synthetic-size", c.synthetic_size);
  v("model", c.model);
  v("init", c.init);
  v("projector", c.projector);
  v("lambda", c.lambda);
  v("min-scale", c.min_scale);
  v("optimizer", c.optimizer);
  v("opt", c.optimizer_options);
  v("lr", c.lr);
  v("weight-decay", c.weight_decay);
  v("schedule", c.schedule);
  v("warmup-epochs", c.warmup_epochs);
  v("final-ratio", c.final_ratio);
  v("batch-size", c.batch_size);
  v("epochs", c.epochs);
  v("seed", c.seed);
  v("threads", c.threads);
  v("device", c.device);
  v("out", c.out);
  v("telemetry-every", c.telemetry_every);
  v("checkpoint-every", c.checkpoint_every);
  v("progress", c.progress);
  v("plots", c.plots);
  v("sync-bn", c.sync_bn);
  v("dist-timeout", c.dist_timeout);
  v("bucket-mb", c.bucket_mb);
}

template <class Config, class Visitor>
void linear_eval_fields(Config& c, Visitor&& v) {
  v("backbone", c.backbone);
  v("data", c.data);
  v("data-dir", c.data_dir);
  v("synthetic-size", c.synthetic_size);
  v("model", c.model);
  v("init", c.init);
  v("augment", c.augment);
  v("standardize", c.standardize);
  v("lr", c.lr);
  v("momentum", c.momentum);
  v("weight-decay", c.weight_decay);
  v("batch-size", c.batch_size);
  v("eval-batch-size", c.eval_batch_size);
  v("epochs", c.epochs);
  v("seed", c.seed);
  v("threads", c.threads);
  v("device", c.device);
  v("out", c.out);
  v("progress", c.progress);
  v("plots", c.plots);
}

template <class Config, class Fields>
Config config_from_json(const std::string& text, const std::string& source, Fields fields) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {  // parse_error, and out_of_range for 1e99999
    usage(source + ": not valid JSON (" + std::string(e.what()) + ")");
  }
  if (!j.is_object()) usage(source + ": expected a JSON object");
  Config c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    JsonReader reader{it.key(), it.value(), source};
    fields(c, reader);
    if (!reader.matched) usage(source + ": unknown key '" + it.key() + "'");
  }
  return c;
}

void check_common(const std::string& data, const std::string& model, const std::string& init,
                  const std::string& progress, const std::string& device, const std::string& out, int64_t threads) {
  const auto& datasets = data::dataset_names();
  if (std::find(datasets.begin(), datasets.end(), data) == datasets.end())
    usage("--data: unknown data set '" + data + "'");
  const auto& models = models::model_names();
  if (!model.empty() && std::find(models.begin(), models.end(), model) == models.end())
    usage("--model: unknown model '" + model + "'");
  const auto& inits = models::init_names();
  if (std::find(inits.begin(), inits.end(), init) == inits.end()) usage("--init: unknown method '" + init + "'");
  if (!one_of(progress, {"auto", "bar", "lines", "none"}))
    usage("--progress: '" + progress + "' is not auto, bar, lines or none");
  if (!(device == "cpu" || device.rfind("cuda", 0) == 0)) usage("--device: '" + device + "' is not cpu or cuda[:N]");
  if (out.empty()) usage("--out must not be empty");
  if (threads < 0) usage("--threads must be >= 0");
}

// "1024-1024-1024" -> {1024, 1024, 1024}; UsageError naming --projector otherwise.
std::vector<int64_t> parse_projector(const std::string& text) {
  std::vector<int64_t> sizes;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, '-')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || *end != '\0' || v <= 0 || v > 65536)
      usage("--projector: '" + text + "' is not a list of layer sizes such as 1024-1024-1024 (each 1..65536)");
    sizes.push_back(v);
  }
  if (sizes.empty()) usage("--projector: empty");
  return sizes;
}

uint64_t mix64(uint64_t x) {  // splitmix64's finaliser
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

// The views of a batch depend only on (seed, epoch, batch index): a resumed run draws the same ones.
uint64_t view_seed(uint64_t seed, int64_t epoch, int64_t index) {
  return mix64(mix64(mix64(seed) ^ static_cast<uint64_t>(epoch)) ^ static_cast<uint64_t>(index));
}

// ------------------------------------------------------------------ the pre-training network

// Barlow Twins' projector: Linear (no bias) - BatchNorm - ReLU for every layer but the last, which is a bare
// Linear. BatchNorm is the zoo's SyncableBatchNorm2d on [n, C, 1, 1], so --sync-bn reaches it too.
class ProjectorImpl : public torch::nn::Module {
 public:
  ProjectorImpl(int64_t in, const std::vector<int64_t>& sizes) {
    for (size_t i = 0; i < sizes.size(); ++i) {
      linears_.push_back(register_module("linear" + std::to_string(i),
                                         torch::nn::Linear(torch::nn::LinearOptions(in, sizes[i]).bias(false))));
      if (i + 1 < sizes.size())
        norms_.push_back(register_module("bn" + std::to_string(i), models::SyncableBatchNorm2d(sizes[i])));
      in = sizes[i];
    }
  }
  torch::Tensor forward(torch::Tensor x) {
    for (size_t i = 0; i < linears_.size(); ++i) {
      x = linears_[i](x);
      if (i < norms_.size()) x = torch::relu(norms_[i](x.view({x.size(0), x.size(1), 1, 1})).view({x.size(0), -1}));
    }
    return x;
  }

 private:
  std::vector<torch::nn::Linear> linears_;
  std::vector<models::SyncableBatchNorm2d> norms_;
};
TORCH_MODULE(Projector);

class BarlowTwinsNetImpl : public torch::nn::Module {
 public:
  BarlowTwinsNetImpl(models::Classifier backbone_, const std::vector<int64_t>& sizes)
      : backbone(register_module("backbone", std::move(backbone_))),
        projector(register_module("projector", Projector(backbone->feature_dim(), sizes))) {}
  torch::Tensor forward(const torch::Tensor& x) { return projector(backbone->features(x)); }
  // What the optimizer trains: everything but the backbone's classifier head.
  lo::NamedParameters trainable() {
    lo::NamedParameters out;
    for (auto& kv : models::backbone_parameters(*backbone)) out.insert("backbone." + kv.first, kv.second);
    for (const auto& kv : projector->named_parameters()) out.insert("projector." + kv.key(), kv.value());
    return out;
  }
  models::Classifier backbone;
  Projector projector;
};
TORCH_MODULE(BarlowTwinsNet);

std::string pretrain_metrics_header() {
  return "epoch,step,lr,phi,train_loss,on_diagonal,off_diagonal,epoch_seconds,img_per_s,data_wait_s,augment_s,"
         "compute_s,allreduce_s,optimizer_s\n";
}

std::string pretrain_metrics_row(const PretrainRecord& r, double augment_seconds) {
  return format("%lld,%lld,%.9g,%.9g,%.6f,%.6f,%.6f,%.3f,%.1f,%.3f,%.3f,%.3f,%.3f,%.3f\n",
                static_cast<long long>(r.epoch), static_cast<long long>(r.step), r.lr, r.phi, r.train_loss,
                r.on_diagonal, r.off_diagonal, r.epoch_seconds, r.images_per_second, r.data_wait_seconds,
                augment_seconds, r.compute_seconds, r.allreduce_seconds, r.optimizer_seconds);
}

json pretrain_record_json(const PretrainRecord& r, double augment_seconds) {
  return json{{"epoch", r.epoch}, {"step", r.step}, {"lr", r.lr}, {"phi", r.phi}, {"train_loss", r.train_loss},
              {"on_diagonal", r.on_diagonal}, {"off_diagonal", r.off_diagonal}, {"epoch_seconds", r.epoch_seconds},
              {"img_per_s", r.images_per_second}, {"data_wait_s", r.data_wait_seconds},
              {"augment_s", augment_seconds}, {"compute_s", r.compute_seconds},
              {"allreduce_s", r.allreduce_seconds}, {"optimizer_s", r.optimizer_seconds}};
}

PretrainRecord pretrain_record_from(const json& j, double* augment_seconds) {
  PretrainRecord r;
  r.epoch = j.at("epoch");
  r.step = j.at("step");
  r.lr = j.at("lr");
  r.phi = j.at("phi");
  r.train_loss = j.at("train_loss");
  r.on_diagonal = j.at("on_diagonal");
  r.off_diagonal = j.at("off_diagonal");
  r.epoch_seconds = j.at("epoch_seconds");
  r.images_per_second = j.at("img_per_s");
  r.data_wait_seconds = j.at("data_wait_s");
  *augment_seconds = j.at("augment_s");
  r.compute_seconds = j.at("compute_s");
  r.allreduce_seconds = j.at("allreduce_s");
  r.optimizer_seconds = j.at("optimizer_s");
  return r;
}

}  // namespace

// ------------------------------------------------------------------ pretrain config

std::string PretrainConfig::to_json() const {
  json j;
  pretrain_fields(*this, JsonWriter{j});
  return j.dump(2) + "\n";
}

PretrainConfig PretrainConfig::from_json(const std::string& text, const std::string& source) {
  return config_from_json<PretrainConfig>(text, source, [](PretrainConfig& c, JsonReader& r) { pretrain_fields(c, r); });
}

void PretrainConfig::validate() const {
  check_common(data, model, init, progress, device, out, threads);
  if (model.empty()) usage("--model must not be empty");
  parse_projector(projector);
  try {
    lo::find_recipe(optimizer);
  } catch (const std::invalid_argument& e) {
    usage(std::string("--optimizer: ") + e.what());
  }
  if (!one_of(schedule, {"auto", "constant", "cosine", "warmup-cosine"}))
    usage("--schedule: '" + schedule + "' is not auto, constant, cosine or warmup-cosine");
  if (!(lambda >= 0 && std::isfinite(lambda))) usage("--lambda must be finite and >= 0");
  if (!(min_scale > 0 && min_scale <= 1)) usage("--min-scale must be in (0, 1]");
  if (batch_size < 2) usage("--batch-size must be >= 2 (Barlow Twins normalises over the batch)");
  if (epochs <= 0) usage("--epochs must be > 0, got " + std::to_string(epochs));
  if (loader_workers <= 0) usage("--loader-workers must be > 0");
  if (synthetic_size <= 0) usage("--synthetic-size must be > 0");
  if (telemetry_every < 0) usage("--telemetry-every must be >= 0");
  if (checkpoint_every < 0) usage("--checkpoint-every must be >= 0 (0: at the end of each epoch), got " +
                                  std::to_string(checkpoint_every));
  if (lr != -1 && !(lr >= 0 && std::isfinite(lr))) usage("--lr must be finite and >= 0");
  if (weight_decay != -1 && !(weight_decay >= 0 && std::isfinite(weight_decay))) usage("--weight-decay must be >= 0");
  if (!(warmup_epochs >= 0)) usage("--warmup-epochs must be >= 0");
  if (!(final_ratio >= 0 && final_ratio <= 1)) usage("--final-ratio must be in [0, 1]");
  if (!(dist_timeout > 0 && std::isfinite(dist_timeout))) usage("--dist-timeout must be > 0 seconds");
  if (!(bucket_mb > 0 && std::isfinite(bucket_mb))) usage("--bucket-mb must be > 0");
}

// ------------------------------------------------------------------ pretrain

PretrainSummary run_pretraining(const PretrainConfig& config) {
  // A stop request from here on (data loading and restoring included) is kept: the loop stops after its first step.
  stop_flag() = false;
  const auto t_start = Clock::now();
  config.validate();
  (void)optim::fused_step_instruction_set();  // a bad LARGEBATCH_STEP_SIMD is refused before any work
  set_threads(config.threads);
  const torch::Device device = parse_device(config.device);
  const fs::path out(config.out);
  const std::vector<int64_t> projector_sizes = parse_projector(config.projector);

  dist::LaunchEnv env;
  try {
    env = dist::launch_env_from_environment();
  } catch (const std::invalid_argument& e) {
    usage(e.what());
  }
  const int64_t world = env.world;
  const bool lead = env.rank == 0;
  if (config.batch_size % world != 0)
    usage("--batch-size " + std::to_string(config.batch_size) + " is not divisible by the world size " +
          std::to_string(world) + " (WORLD_SIZE)");
  const fs::path checkpoint_path = out / "checkpoint.pt";
  const bool resuming = prepare_output_dir(out, config.resume, lead, [&](const std::string& saved) {
    const PretrainConfig before = PretrainConfig::from_json(saved, (out / "config.json").string());
    require_same_on_resume("--data", config.data, before.data, out);
    require_same_on_resume("--model", config.model, before.model, out);
    require_same_on_resume("--projector", config.projector, before.projector, out);
    require_same_on_resume("--optimizer", config.optimizer, before.optimizer, out);
    require_same_on_resume("--batch-size", config.batch_size, before.batch_size, out);
    require_same_on_resume("--seed", config.seed, before.seed, out);
  });

  const data::DatasetSplit split = load_data(config.data, config.data_dir, config.synthetic_size, config.seed);
  const auto& train_set = split.train;
  if (train_set.size() < config.batch_size && train_set.size() < 2)
    usage("--data " + config.data + ": too few training images for Barlow Twins");
  auto backbone = make_classifier(config.model, train_set, config.init, config.seed, train_set.num_classes);
  torch::manual_seed(mix64(config.seed) & 0x7fffffffffffffffULL);  // the projector's initialisation
  BarlowTwinsNet net(backbone, projector_sizes);
  net->to(device);

  std::shared_ptr<dist::Communicator> comm;
  if (env.distributed()) comm = connect_ranks(env, device, config.dist_timeout, config.sync_bn, *net);

  // The loader yields raw pixels in [0, 1]; the views are drawn per global batch and then normalised.
  data::LoaderOptions loader_options;
  loader_options.batch_size = config.batch_size;
  loader_options.shuffle = true;
  // A last batch of one image has no batch statistics; Barlow Twins needs at least two.
  loader_options.drop_last = train_set.size() % config.batch_size == 1 ||
                             (world > 1 && train_set.size() % config.batch_size > 0 &&
                              train_set.size() % config.batch_size < 2 * world);
  loader_options.seed = config.seed;
  loader_options.workers = config.loader_workers;
  loader_options.prefetch = 2;
  loader_options.augment.normalize = false;
  loader_options.rank = env.rank;
  loader_options.world = world;
  data::BatchLoader loader(train_set, loader_options);
  const int64_t steps_per_epoch = loader.batches_per_epoch();
  if (steps_per_epoch == 0) usage("--batch-size " + std::to_string(config.batch_size) + " is larger than the data set");
  const int64_t total_steps = config.epochs * steps_per_epoch;
  const auto mean = torch::tensor(std::vector<float>(train_set.mean.begin(), train_set.mean.end())).view({1, -1, 1, 1});
  const auto stdev = torch::tensor(std::vector<float>(train_set.std.begin(), train_set.std.end())).view({1, -1, 1, 1});
  ViewOptions view_options;
  view_options.min_scale = config.min_scale;

  // Optimizer: the recipe's self-supervised defaults (optim/recipes.h), then --opt, then --weight-decay.
  auto given = config.optimizer_options;
  if (config.weight_decay >= 0) given["weight_decay"] = format("%.17g", config.weight_decay);
  const lo::ResolvedRecipe recipe = lo::resolve_recipe(config.optimizer, lo::Task::kSelfSupervised, config.batch_size,
                                                       total_steps, config.lr, config.schedule, given);
  const double lr = recipe.lr;
  const std::string& schedule_name = recipe.schedule;
  if (schedule_name == "warmup-cosine" && config.warmup_epochs > static_cast<double>(config.epochs))
    usage("--warmup-epochs " + format("%g", config.warmup_epochs) + " is longer than --epochs " +
          std::to_string(config.epochs));
  std::unique_ptr<torch::optim::Optimizer> optimizer;
  try {
    optimizer = lo::make_optimizer({recipe.optimizer, lr, config.batch_size, recipe.options}, net->trainable());
  } catch (const std::invalid_argument& e) {
    usage(std::string("--opt: ") + e.what());
  }
  auto* layerwise = dynamic_cast<lo::LayerwiseOptimizer*>(optimizer.get());
  if (layerwise) layerwise->set_telemetry(true);
  lo::ScheduleOptions so;
  so.kind = lo::parse_schedule_kind(schedule_name);
  so.lr = lr;
  so.batch_size = config.batch_size;
  // The warm-up is counted in this run's own steps, so it spans what the run actually trains.
  so.warmup_steps = so.kind == lo::ScheduleKind::kWarmupCosine
                        ? std::min<int64_t>(total_steps, std::llround(config.warmup_epochs * steps_per_epoch))
                        : 0;
  so.total_steps = total_steps;
  so.final_ratio = config.final_ratio;
  const lo::LrSchedule schedule(so);
  const c10::optional<lo::TimeVarying> tv =
      layerwise ? static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).time_varying()
                : c10::nullopt;

  PretrainSummary summary;
  std::vector<double> augment_history;
  int64_t start_epoch = 0, step = 0;
  json within_epoch = json::object();  // as in run_training: an unfinished epoch's batch and sums
  if (resuming) {
    const json meta = load_checkpoint(checkpoint_path, *net, *optimizer, device);
    start_epoch = meta.at("epoch");
    step = meta.at("step");
    within_epoch = within_epoch_of(meta, steps_per_epoch, checkpoint_path);
    for (const auto& r : meta.at("history")) {
      double a = 0;
      summary.history.push_back(pretrain_record_from(r, &a));
      augment_history.push_back(a);
    }
    if (lead) {
      std::string rows = pretrain_metrics_header();
      for (size_t i = 0; i < summary.history.size(); ++i) rows += pretrain_metrics_row(summary.history[i], augment_history[i]);
      write_atomically(out / "metrics.csv", rows);
      print_resumed(out, start_epoch, within_epoch, step);
    }
  } else if (lead) {
    write_atomically(out / "metrics.csv", pretrain_metrics_header());
  }
  require_same_resume_point(comm.get(), resuming, step, out);
  // config.json records the learning rate used (a recipe's default resolved), so that it alone rebuilds the run.
  PretrainConfig recorded = config;
  recorded.lr = recipe.lr;
  if (lead) write_atomically(out / "config.json", recorded.to_json());

  std::unique_ptr<dist::GradientAverager> averager;
  if (comm) {
    dist::broadcast_module(*net, *comm);
    std::vector<torch::Tensor> trainable;
    for (const auto& kv : net->trainable()) trainable.push_back(kv.value());
    averager = std::make_unique<dist::GradientAverager>(trainable, comm, std::llround(config.bucket_mb * 1024 * 1024));
  }
  std::ofstream telemetry;
  if (config.telemetry_every > 0 && lead) {
    open_telemetry(telemetry, out / "telemetry.csv", resuming, step);
    if (!layerwise) std::printf("note: --telemetry-every records layer-wise optimizers only\n");
  }

  if (lead) {
    std::printf("largebatch pretrain: Barlow Twins on %s (%lld images) | %s backbone (%lld features) + projector %s, "
                "%lld parameters trained | %s lr %.4g (%s schedule) | batch %lld | %lld epochs x %lld steps | %s\n",
                config.data.c_str(), static_cast<long long>(train_set.size()), config.model.c_str(),
                static_cast<long long>(backbone->feature_dim()), config.projector.c_str(),
                static_cast<long long>([&] {
                  int64_t n = 0;
                  for (const auto& kv : net->trainable()) n += kv.value().numel();
                  return n;
                }()),
                config.optimizer.c_str(), lr, schedule_name.c_str(), static_cast<long long>(config.batch_size),
                static_cast<long long>(config.epochs), static_cast<long long>(steps_per_epoch), out.string().c_str());
    if (comm)
      std::printf("data parallel: %lld ranks over %s, %s BatchNorm\n", static_cast<long long>(world),
                  comm->backend().c_str(), config.sync_bn ? "synchronised" : "per-rank");
    if (layerwise)
      std::printf("optimizer options: %s\n",
                  static_cast<const lo::LayerwiseOptions&>(layerwise->param_groups()[0].options()).describe().c_str());
    std::fflush(stdout);
  }

  Progress progress(lead ? config.progress : "none", config.epochs, steps_per_epoch);
  summary.status = "completed";
  net->train();
  auto checkpoint_meta = [&](int64_t epoch, const json& within) {
    json meta{{"epoch", epoch}, {"step", step}, {"history", json::array()}};
    for (size_t i = 0; i < summary.history.size(); ++i)
      meta["history"].push_back(pretrain_record_json(summary.history[i], augment_history[i]));
    if (!within.empty()) meta["within_epoch"] = within;
    return meta;
  };
  for (int64_t epoch = start_epoch; epoch < config.epochs; ++epoch) {
    const json resumed = epoch == start_epoch ? within_epoch : json::object();
    const auto t_epoch = Clock::now() - std::chrono::duration_cast<Clock::duration>(
                                            std::chrono::duration<double>(resumed.value("elapsed_s", 0.0)));
    const double wait_before = loader.wait_seconds();
    int64_t index = resumed.value("batch", int64_t{0});
    loader.start_epoch(epoch, index);
    data::Batch batch;
    double loss_sum = resumed.value("loss_sum", 0.0), on_sum = resumed.value("on_sum", 0.0),
           off_sum = resumed.value("off_sum", 0.0);
    int64_t steps_done = resumed.value("steps_done", int64_t{0}), seen = resumed.value("seen", int64_t{0});
    double lr_t = resumed.value("lr", 0.0), phi_t = resumed.value("phi", 1.0),
           augment_s = resumed.value("augment_s", 0.0), compute_s = resumed.value("compute_s", 0.0),
           allreduce_s = resumed.value("allreduce_s", 0.0), optimizer_s = resumed.value("optimizer_s", 0.0);
    // After each step: a checkpoint within the epoch when due or stopping (as run_training), then the test hook.
    auto after_step = [&](bool stopping) {
      if (lead && checkpoint_within_epoch_due(config.checkpoint_every, step, index, steps_per_epoch, stopping)) {
        const json within{{"batch", index},         {"loss_sum", loss_sum},       {"on_sum", on_sum},
                          {"off_sum", off_sum},     {"steps_done", steps_done},   {"seen", seen},
                          {"lr", lr_t},             {"phi", phi_t},               {"augment_s", augment_s},
                          {"compute_s", compute_s}, {"allreduce_s", allreduce_s}, {"optimizer_s", optimizer_s},
                          {"elapsed_s", seconds_since(t_epoch)}};
        if (telemetry.is_open()) telemetry.flush();  // the rows the checkpoint covers are on disk before it
        save_checkpoint(checkpoint_path, *net, *optimizer, checkpoint_meta(epoch, within));
      }
      if (config.crash_after_step >= 0 && step > config.crash_after_step)
        throw SimulatedCrash("simulated crash after step " + std::to_string(config.crash_after_step));
    };
    while (loader.next(batch)) {
      lr_t = schedule.at(step);
      phi_t = tv ? lo::tv_phi(*tv, step) : 1.0;
      lo::set_learning_rate(*optimizer, lr_t);
      auto t_phase = Clock::now();
      const uint64_t seed = view_seed(config.seed, epoch, batch.index);
      auto view = [&](int v) {
        return ((barlow_twins_view(batch.images, v, seed, batch.global_size, batch.offset, view_options) - mean) / stdev)
            .to(device);
      };
      const auto x1 = view(0), x2 = view(1);
      augment_s += seconds_since(t_phase);
      t_phase = Clock::now();
      if (averager) averager->zero_grad();
      else optimizer->zero_grad();
      BarlowTwinsTerms terms;
      const auto loss = barlow_twins_loss(net->forward(x1), net->forward(x2), config.lambda, comm.get(), &terms);
      loss.backward();
      compute_s += seconds_since(t_phase);
      t_phase = Clock::now();
      bool stop_now = stop_flag();
      if (comm) {
        averager->finish();
        auto agreed = torch::tensor({stop_now ? 1.0 : 0.0}, torch::kFloat64);
        dist::guarded(*comm, [&] { comm->all_reduce_sum(agreed); });
        stop_now = agreed[0].item<double>() > 0;
      }
      allreduce_s += seconds_since(t_phase);
      // The loss is the same on every rank (C is summed over ranks), so every rank takes the same decision.
      // One host copy per step for the loss and its two terms.
      const auto logged = torch::stack({loss.detach(), terms.on_diagonal, terms.off_diagonal}).to(torch::kCPU,
                                                                                                 torch::kFloat64);
      const double loss_value = logged[0].item<double>();
      if (!std::isfinite(loss_value)) {
        summary.status = "diverged";
        summary.message = format("non-finite loss (%g) at step %lld (epoch %lld)", loss_value,
                                 static_cast<long long>(step), static_cast<long long>(epoch + 1)) +
                          largest_trust_ratio(layerwise) + "; the last good checkpoint is " +
                          (fs::exists(checkpoint_path) ? checkpoint_path.string() : "none");
        break;
      }
      t_phase = Clock::now();
      optimizer->step();
      optimizer_s += seconds_since(t_phase);
      if (telemetry.is_open() && layerwise && step % config.telemetry_every == 0)
        write_telemetry(telemetry, step, layerwise->last_telemetry());
      ++step;
      ++steps_done;
      loss_sum += loss_value;
      on_sum += logged[1].item<double>();
      off_sum += logged[2].item<double>();
      seen += batch.global_size;
      progress.step(epoch, index++,
                    format("loss %.2f %.0f img/s", loss_sum / static_cast<double>(steps_done),
                           static_cast<double>(seen) / seconds_since(t_epoch)));
      after_step(stop_now);
      if (stop_now) {
        summary.status = "interrupted";
        summary.message = "stopped by a signal at step " + std::to_string(step) + "; resume from " +
                          (fs::exists(checkpoint_path) ? checkpoint_path.string() : "the start (no checkpoint yet)");
        break;
      }
    }
    if (summary.status != "completed") break;
    if (telemetry.is_open()) telemetry.flush();
    PretrainRecord r;
    r.epoch = epoch + 1;
    r.step = step;
    r.lr = lr_t;
    r.phi = phi_t;
    r.train_loss = loss_sum / static_cast<double>(steps_done);
    r.on_diagonal = on_sum / static_cast<double>(steps_done);
    r.off_diagonal = off_sum / static_cast<double>(steps_done);
    r.epoch_seconds = seconds_since(t_epoch);
    r.images_per_second = static_cast<double>(seen) / r.epoch_seconds;
    r.data_wait_seconds = loader.wait_seconds() - wait_before;
    r.compute_seconds = compute_s;
    r.allreduce_seconds = allreduce_s;
    r.optimizer_seconds = optimizer_s;
    summary.history.push_back(r);
    augment_history.push_back(augment_s);
    // Without --sync-bn each rank's running statistics saw only its shards: keep rank 0's, as DDP does.
    if (comm) dist::broadcast_buffers(*net, *comm);
    if (lead) {
      save_checkpoint(checkpoint_path, *net, *optimizer, checkpoint_meta(epoch + 1, json::object()));
      append_line(out / "metrics.csv", pretrain_metrics_row(r, augment_s));
    }
    progress.epoch_line(format("epoch %3lld/%lld  step %6lld  lr %.4g  phi %.4f  loss %.3f (on-diagonal %.3f, "
                               "off-diagonal %.2f)  %.1fs %.0f img/s (views %.1fs)",
                               static_cast<long long>(r.epoch), static_cast<long long>(config.epochs),
                               static_cast<long long>(r.step), r.lr, r.phi, r.train_loss, r.on_diagonal,
                               r.off_diagonal, r.epoch_seconds, r.images_per_second, augment_s));
  }

  summary.steps = step;
  summary.epochs_done = summary.history.empty() ? 0 : summary.history.back().epoch;
  summary.final_loss = summary.history.empty() ? 0 : summary.history.back().train_loss;
  summary.world_size = world;
  summary.rank = env.rank;
  if (comm) {
    summary.replica_mismatches = replica_mismatches(*net, *comm, lead);
    dist::guarded(*comm, [&] { comm->barrier(); });
  }
  summary.wall_seconds = seconds_since(t_start);
  if (!lead) return summary;
  if (summary.status == "completed") save_module(out / "backbone.pt", *backbone);
  json s{{"status", summary.status},
         {"message", summary.message},
         {"epochs_done", summary.epochs_done},
         {"steps", summary.steps},
         {"final_loss", summary.final_loss},
         {"wall_seconds", summary.wall_seconds},
         {"optimizer", config.optimizer},
         {"model", config.model},
         {"projector", config.projector},
         {"data", config.data},
         {"batch_size", config.batch_size},
         {"world_size", summary.world_size},
         {"replica_mismatches", summary.replica_mismatches},
         {"backbone", summary.status == "completed" ? (out / "backbone.pt").string() : ""},
         {"optimizer_resolved", resolved_optimizer_json(recipe, *optimizer, so.warmup_steps, total_steps)}};
  write_atomically(out / "summary.json", s.dump(2) + "\n");
  if (config.plots) {
    telemetry.close();
    report::plot_run(out.string());
  }
  return summary;
}

// ------------------------------------------------------------------ linear-eval config

std::string LinearEvalConfig::to_json() const {
  json j;
  linear_eval_fields(*this, JsonWriter{j});
  return j.dump(2) + "\n";
}

LinearEvalConfig LinearEvalConfig::from_json(const std::string& text, const std::string& source) {
  return config_from_json<LinearEvalConfig>(text, source,
                                            [](LinearEvalConfig& c, JsonReader& r) { linear_eval_fields(c, r); });
}

void LinearEvalConfig::validate() const {
  check_common(data, model, init, progress, device, out, threads);
  if (backbone.empty()) usage("--backbone is required: a backbone.pt of `pretrain`, a model.pt of `train`, or random");
  if (backbone == "random" && model.empty()) usage("--backbone random needs --model");
  if (backbone != "random" && !fs::exists(backbone)) usage("--backbone: no such file " + backbone);
  if (!one_of(augment, {"none", "flip", "crop-flip"})) usage("--augment: '" + augment + "' is not none, flip or crop-flip");
  if (!(lr > 0 && std::isfinite(lr))) usage("--lr must be finite and > 0");
  if (!(momentum >= 0 && momentum < 1)) usage("--momentum must be in [0, 1)");
  if (!(weight_decay >= 0 && std::isfinite(weight_decay))) usage("--weight-decay must be >= 0");
  if (batch_size <= 0) usage("--batch-size must be > 0");
  if (eval_batch_size <= 0) usage("--eval-batch-size must be > 0");
  if (epochs <= 0) usage("--epochs must be > 0, got " + std::to_string(epochs));
  if (synthetic_size <= 0) usage("--synthetic-size must be > 0");
}

// ------------------------------------------------------------------ linear-eval

namespace {

// The linear head with its fixed feature standardisation (buffers, saved with it in head.pt).
class LinearProbeImpl : public torch::nn::Module {
 public:
  LinearProbeImpl(int64_t features, int64_t classes)
      : feature_mean(register_buffer("feature_mean", torch::zeros({features}))),
        feature_std(register_buffer("feature_std", torch::ones({features}))),
        linear(register_module("linear", torch::nn::Linear(features, classes))) {}
  torch::Tensor forward(const torch::Tensor& features) { return linear((features - feature_mean) / feature_std); }
  torch::Tensor feature_mean, feature_std;
  torch::nn::Linear linear;
};
TORCH_MODULE(LinearProbe);

// Features of every image of a data set (deterministic, no augmentation), in order, on the device.
torch::Tensor extract_features(models::ClassifierImpl& backbone, const data::ImageDataset& set, int64_t batch_size,
                               torch::Device device) {
  torch::NoGradGuard no_grad;
  data::LoaderOptions o;
  o.batch_size = batch_size;
  o.shuffle = false;
  o.workers = 2;
  data::BatchLoader loader(set, o);
  loader.start_epoch(0);
  std::vector<torch::Tensor> parts;
  data::Batch batch;
  while (loader.next(batch)) parts.push_back(backbone.features(batch.images.to(device)));
  return torch::cat(parts);
}

// The model the backbone file holds: --model, else the "model" of the config.json beside it.
std::string backbone_model_name(const LinearEvalConfig& c) {
  if (!c.model.empty()) return c.model;
  const fs::path config = fs::path(c.backbone).parent_path() / "config.json";
  std::ifstream in(config);
  if (!in) usage("--backbone " + c.backbone + ": no config.json beside it to name the model; pass --model");
  try {
    const json j = json::parse(in);
    return j.at("model").get<std::string>();
  } catch (const std::exception&) {
    usage(config.string() + ": no \"model\" string to name the backbone's model; pass --model");
  }
}

}  // namespace

TrainSummary run_linear_eval(const LinearEvalConfig& config) {
  // A stop request from here on (data loading and restoring included) is kept: the loop stops after its first step.
  stop_flag() = false;
  const auto t_start = Clock::now();
  config.validate();
  (void)optim::fused_step_instruction_set();  // a bad LARGEBATCH_STEP_SIMD is refused before any work
  set_threads(config.threads);
  const torch::Device device = parse_device(config.device);
  const fs::path out(config.out);
  dist::LaunchEnv env;
  try {
    env = dist::launch_env_from_environment();
  } catch (const std::invalid_argument& e) {
    usage(e.what());
  }
  if (env.distributed())
    usage("linear-eval runs in one process (WORLD_SIZE is " + std::to_string(env.world) +
          "): the frozen features make it cheap; start it without a launcher");
  const fs::path checkpoint_path = out / "checkpoint.pt";
  const bool resuming = prepare_output_dir(out, config.resume, true, [&](const std::string& saved) {
    const LinearEvalConfig before = LinearEvalConfig::from_json(saved, (out / "config.json").string());
    require_same_on_resume("--backbone", config.backbone, before.backbone, out);
    require_same_on_resume("--data", config.data, before.data, out);
    require_same_on_resume("--batch-size", config.batch_size, before.batch_size, out);
    require_same_on_resume("--seed", config.seed, before.seed, out);
  });

  const data::DatasetSplit split = load_data(config.data, config.data_dir, config.synthetic_size, config.seed);
  const std::string model_name = backbone_model_name(config);
  if (std::find(models::model_names().begin(), models::model_names().end(), model_name) == models::model_names().end())
    usage("--backbone " + config.backbone + ": unknown model '" + model_name + "' in its config.json");
  models::Classifier backbone;
  if (config.backbone == "random") {
    backbone = make_classifier(model_name, split.train, config.init, config.seed, split.train.num_classes);
  } else {
    // The file's head may have another number of classes (pre-trained on another data set): read its size.
    torch::serialize::InputArchive archive;
    try {
      load_archive(config.backbone, archive, torch::kCPU);  // a GPU-trained file loads anywhere; moved below
    } catch (const CheckpointError& e) {
      usage("--backbone " + config.backbone +
            ": not a model file (backbone.pt or checkpoint.pt of pretrain, model.pt of train): " + e.what());
    }  // load_archive turns every LibTorch error into a CheckpointError
    // A pretrain checkpoint.pt holds the whole network: its "backbone" part is the classifier module.
    {
      torch::serialize::InputArchive model_part, backbone_part;
      if (archive.try_read("model", model_part) && model_part.try_read("backbone", backbone_part))
        archive = std::move(backbone_part);
    }
    int64_t classes = split.train.num_classes;
    {
      const auto probe = make_classifier(model_name, split.train, "default", 0, classes);
      torch::serialize::InputArchive head;
      torch::Tensor weight;
      if (archive.try_read(probe->head_name(), head) && head.try_read("weight", weight) && weight.dim() == 2)
        classes = weight.size(0);
    }
    backbone = make_classifier(model_name, split.train, "default", 0, classes);
    try {
      backbone->load(archive);
    } catch (const std::exception&) {  // c10::Error, torch::jit::ErrorReport, ...
      usage("--backbone " + config.backbone + ": does not hold a " + model_name + " for " +
            std::to_string(split.train.channels()) + "x" + std::to_string(split.train.height()) + "x" +
            std::to_string(split.train.width()) + " images of " + config.data);
    }
  }
  backbone->to(device);
  for (auto& p : backbone->parameters()) p.set_requires_grad(false);
  backbone->eval();  // frozen: BatchNorm uses its running statistics, never updates them

  std::printf("largebatch linear-eval: %s backbone %s (%lld features, frozen) on %s (%lld train / %lld test) | "
              "SGD lr %.4g momentum %.2g weight decay %.2g, cosine over %lld epochs, batch %lld | %s\n",
              model_name.c_str(), config.backbone.c_str(), static_cast<long long>(backbone->feature_dim()),
              config.data.c_str(), static_cast<long long>(split.train.size()),
              static_cast<long long>(split.test.size()), config.lr, config.momentum, config.weight_decay,
              static_cast<long long>(config.epochs), static_cast<long long>(config.batch_size), out.string().c_str());
  std::fflush(stdout);

  // Features of the unaugmented images: the test set's always, the training set's for the standardisation and,
  // without --augment, for every epoch (the backbone is frozen, so they never change).
  const auto t_features = Clock::now();
  const torch::Tensor train_features = extract_features(*backbone, split.train, config.eval_batch_size, device);
  const torch::Tensor test_features = extract_features(*backbone, split.test, config.eval_batch_size, device);
  const double feature_seconds = seconds_since(t_features);
  const torch::Tensor train_labels = split.train.labels.to(device), test_labels = split.test.labels.to(device);

  torch::manual_seed(mix64(config.seed ^ 0x5eedULL) & 0x7fffffffffffffffULL);
  LinearProbe probe(backbone->feature_dim(), split.train.num_classes);
  if (config.standardize) {
    torch::NoGradGuard no_grad;
    probe->feature_mean.copy_(train_features.mean(0));
    // BatchNorm's eps keeps rare features from being blown up; a feature that is constant on the training set
    // (a dead ReLU) keeps its scale, or its untrained weight would multiply test values by 1 / eps.
    const auto var = train_features.var(0, /*unbiased=*/false);
    probe->feature_std.copy_(torch::where(var > 1e-10, torch::sqrt(var + 1e-5), torch::ones_like(var)));
  }
  {
    // As MAE's linear probe: small weights (N(0, 0.01)), zero bias; features the training set never moves
    // then add nothing at test time.
    torch::NoGradGuard no_grad;
    probe->linear->weight.normal_(0, 0.01);
    probe->linear->bias.zero_();
  }
  probe->to(device);
  torch::optim::SGD optimizer(probe->parameters(), torch::optim::SGDOptions(config.lr)
                                                       .momentum(config.momentum)
                                                       .weight_decay(config.weight_decay));

  TrainSummary summary;
  int64_t start_epoch = 0, step = 0;
  if (resuming) {
    const json meta = load_checkpoint(checkpoint_path, *probe, optimizer, device);
    start_epoch = meta.at("epoch");
    step = meta.at("step");
    for (const auto& r : meta.at("history")) summary.history.push_back(record_from(r));
    std::string rows = metrics_header();
    for (const auto& r : summary.history) rows += metrics_row(r);
    write_atomically(out / "metrics.csv", rows);
    std::printf("resumed %s at epoch %lld\n", out.string().c_str(), static_cast<long long>(start_epoch));
  } else {
    write_atomically(out / "metrics.csv", metrics_header());
  }
  write_atomically(out / "config.json", config.to_json());
  for (const auto& r : summary.history) {
    if (r.test_top1 > summary.best_test_top1) {
      summary.best_test_top1 = r.test_top1;
      summary.best_epoch = r.epoch;
    }
  }

  std::unique_ptr<data::BatchLoader> augmented;  // with --augment: images through the frozen backbone each epoch
  if (config.augment != "none") {
    data::LoaderOptions o;
    o.batch_size = config.batch_size;
    o.shuffle = true;
    o.seed = config.seed;
    o.workers = 2;
    o.augment = data::augment_preset(config.augment, config.data);
    augmented = std::make_unique<data::BatchLoader>(split.train, o);
  }
  const int64_t n = split.train.size();
  const int64_t steps_per_epoch = augmented ? augmented->batches_per_epoch() : (n + config.batch_size - 1) / config.batch_size;
  Progress progress(config.progress, config.epochs, steps_per_epoch);
  summary.status = "completed";
  namespace F = torch::nn::functional;
  for (int64_t epoch = start_epoch; epoch < config.epochs; ++epoch) {
    const auto t_epoch = Clock::now();
    // Cosine stepped per epoch (CosineAnnealingLR with T_max = epochs, to zero).
    const double lr_e = config.lr * 0.5 * (1.0 + std::cos(M_PI * static_cast<double>(epoch) / static_cast<double>(config.epochs)));
    lo::set_learning_rate(optimizer, lr_e);
    probe->train();
    double loss_sum = 0, optimizer_s = 0, compute_s = 0;
    int64_t correct = 0, seen = 0, index = 0;
    auto train_step = [&](const torch::Tensor& features, const torch::Tensor& labels) {
      auto t_phase = Clock::now();
      optimizer.zero_grad();
      const auto logits = probe->forward(features);
      const auto loss = F::cross_entropy(logits, labels);
      loss.backward();
      compute_s += seconds_since(t_phase);
      t_phase = Clock::now();
      optimizer.step();
      optimizer_s += seconds_since(t_phase);
      const int64_t b = labels.size(0);
      loss_sum += loss.item<double>() * static_cast<double>(b);
      correct += logits.argmax(1).eq(labels).sum().item<int64_t>();
      seen += b;
      ++step;
      progress.step(epoch, index++, format("loss %.4f acc %.4f", loss_sum / static_cast<double>(seen),
                                           static_cast<double>(correct) / static_cast<double>(seen)));
    };
    if (augmented) {
      augmented->start_epoch(epoch);
      data::Batch batch;
      while (!stop_flag() && augmented->next(batch)) {
        torch::Tensor features;
        {
          torch::NoGradGuard no_grad;
          features = backbone->features(batch.images.to(device));
        }
        train_step(features, batch.labels.to(device));
      }
    } else {
      auto gen = at::make_generator<at::CPUGeneratorImpl>(view_seed(config.seed, epoch, 0));
      const auto order = torch::randperm(n, gen, torch::kInt64).to(device);
      for (int64_t start = 0; start < n && !stop_flag(); start += config.batch_size) {
        const auto rows = order.narrow(0, start, std::min(config.batch_size, n - start));
        train_step(train_features.index_select(0, rows), train_labels.index_select(0, rows));
      }
    }
    if (stop_flag()) {
      summary.status = "interrupted";
      summary.message = "stopped by a signal in epoch " + std::to_string(epoch + 1) + "; resume from " +
                        (fs::exists(checkpoint_path) ? checkpoint_path.string() : "the start (no checkpoint yet)");
      break;
    }
    const double train_loss = loss_sum / static_cast<double>(seen);
    if (!std::isfinite(train_loss)) {
      summary.status = "diverged";
      summary.message = format("non-finite loss (%g) in epoch %lld; lower --lr", train_loss,
                               static_cast<long long>(epoch + 1));
      break;
    }
    const double train_seconds = seconds_since(t_epoch);
    EpochRecord r;
    {
      torch::NoGradGuard no_grad;
      probe->eval();
      const auto logits = probe->forward(test_features);
      r.test_loss = F::cross_entropy(logits, test_labels).item<double>();
      const int64_t k = std::min<int64_t>(5, split.test.num_classes);
      const auto hits = std::get<1>(logits.topk(k, 1)).eq(test_labels.unsqueeze(1));
      const double count = static_cast<double>(test_labels.size(0));
      r.test_top1 = hits.select(1, 0).sum().item<double>() / count;
      r.test_top5 = hits.any(1).sum().item<double>() / count;
    }
    r.epoch = epoch + 1;
    r.step = step;
    r.lr = lr_e;
    r.train_loss = train_loss;
    r.train_acc = static_cast<double>(correct) / static_cast<double>(seen);
    r.epoch_seconds = seconds_since(t_epoch);
    r.images_per_second = static_cast<double>(seen) / train_seconds;
    r.compute_seconds = compute_s;
    r.optimizer_seconds = optimizer_s;
    summary.history.push_back(r);
    if (r.test_top1 > summary.best_test_top1) {
      summary.best_test_top1 = r.test_top1;
      summary.best_epoch = r.epoch;
    }
    json meta{{"epoch", epoch + 1}, {"step", step}, {"history", json::array()}};
    for (const auto& h : summary.history) meta["history"].push_back(record_json(h));
    save_checkpoint(checkpoint_path, *probe, optimizer, meta);
    append_line(out / "metrics.csv", metrics_row(r));
    progress.epoch_line(format("epoch %3lld/%lld  lr %.4g  train loss %.4f acc %.4f  test loss %.4f top1 %.4f top5 "
                               "%.4f  %.2fs",
                               static_cast<long long>(r.epoch), static_cast<long long>(config.epochs), r.lr,
                               r.train_loss, r.train_acc, r.test_loss, r.test_top1, r.test_top5, r.epoch_seconds));
  }
  summary.steps = step;
  summary.epochs_done = summary.history.empty() ? 0 : summary.history.back().epoch;
  summary.final_test_top1 = summary.history.empty() ? 0 : summary.history.back().test_top1;
  summary.wall_seconds = seconds_since(t_start);
  if (summary.status == "completed") save_module(out / "head.pt", *probe);
  json s{{"status", summary.status},
         {"message", summary.message},
         {"epochs_done", summary.epochs_done},
         {"steps", summary.steps},
         {"final_test_top1", summary.final_test_top1},
         {"final_test_top5", summary.history.empty() ? 0.0 : summary.history.back().test_top5},
         {"best_test_top1", summary.best_test_top1},
         {"best_epoch", summary.best_epoch},
         {"wall_seconds", summary.wall_seconds},
         {"feature_seconds", feature_seconds},
         {"optimizer", "sgd (linear head)"},
         {"backbone", config.backbone},
         {"model", model_name},
         {"data", config.data},
         {"batch_size", config.batch_size},
         {"world_size", 1},
         {"replica_mismatches", 0}};
  write_atomically(out / "summary.json", s.dump(2) + "\n");
  if (config.plots) report::plot_run(out.string());
  return summary;
}

}  // namespace train
}  // namespace largebatch
